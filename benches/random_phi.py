"""Writes a phi-2-layout checkpoint with random weights (numpy + safetensors, no torch): the
`bench` configuration by default (phi-2's vocabulary and head geometry, hidden 640, 8 heads,
4 layers), fp32, with the tiny fixture's tokenizer (ids it cannot decode get a bias of -30), for
benchmarks that need a model directory (`serve`, `chat`).

    python benches/random_phi.py OUT_DIR [--layers 4] [--hidden 640] [--heads 8]
"""
import argparse
import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "tiny-phi")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=51200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with open(os.path.join(FIXTURE, "config.json")) as f:
        config = json.load(f)
    config.update(
        _name_or_path="phitune-bench-random",
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        num_hidden_layers=a.layers,
        intermediate_size=4 * a.hidden,
        vocab_size=a.vocab,
        torch_dtype="float32",
    )
    rng = np.random.default_rng(a.seed)
    h, i, v = a.hidden, 4 * a.hidden, a.vocab

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, h)}
    for n in range(a.layers):
        p = f"model.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "dense"):
            t[p + f"self_attn.{name}.weight"] = w(h, h)
            t[p + f"self_attn.{name}.bias"] = np.zeros(h, np.float32)
        t[p + "mlp.fc1.weight"] = w(i, h)
        t[p + "mlp.fc1.bias"] = np.zeros(i, np.float32)
        t[p + "mlp.fc2.weight"] = w(h, i)
        t[p + "mlp.fc2.bias"] = np.zeros(h, np.float32)
        t[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "input_layernorm.bias"] = np.zeros(h, np.float32)
    t["model.final_layernorm.weight"] = np.ones(h, np.float32)
    t["model.final_layernorm.bias"] = np.zeros(h, np.float32)
    t["lm_head.weight"] = w(v, h)
    # Only ids the tokenizer knows are likely (the head still computes every logit), so that a
    # reply decodes to text and streams.
    bias = np.zeros(v, np.float32)
    with open(os.path.join(FIXTURE, "tokenizer.json")) as f:
        known = len(json.load(f)["model"]["vocab"])
    bias[known:] = -30.0
    t["lm_head.bias"] = bias
    os.makedirs(a.out, exist_ok=True)
    save_file(t, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        src = os.path.join(FIXTURE, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out, name))
    print(a.out)


if __name__ == "__main__":
    main()
