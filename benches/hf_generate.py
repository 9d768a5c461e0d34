#!/usr/bin/env python3
"""Greedy-generation speed of HF transformers on CPU, for comparison with the Rust implementation.

Model ("bench config"): a random (seeded) Phi with vocab 51200, hidden 640, 8 heads of 80
(rotary dim 32, as phi-2), 4 layers, intermediate 2560, float32, eval mode.

    python benches/hf_generate.py --threads 4 [--prompt-len 32] [--new-tokens 128] [--repeats 3]
    python benches/hf_generate.py --save-dir DIR   # also write the model (phi-2 layout, fp32)

Prints one JSON line:
    {"impl": "hf-transformers", "threads": .., "prompt_len": .., "new_tokens": ..,
     "decode_tokens_per_s": new_tokens / median time, "times_s": [...], "torch": .., "transformers": ..}

The timed region is a whole model.generate call (prefill of the prompt + new_tokens decode steps,
KV cache on).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

SEED = 20240

BENCH_CONFIG = {
    "vocab_size": 51200,
    "hidden_size": 640,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "partial_rotary_factor": 0.4,
    "num_hidden_layers": 4,
    "intermediate_size": 2560,
}
EOS = 50256  # phi-2's bos/eos id


def phi2_style_config_json(torch_dtype="float32"):
    """config.json with exactly microsoft/phi-2's key set and values, bench sizes."""
    c = BENCH_CONFIG
    return {
        "_name_or_path": "phi-bench",
        "architectures": ["PhiForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": EOS,
        "embd_pdrop": 0.0,
        "eos_token_id": EOS,
        "hidden_act": "gelu_new",
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048,
        "model_type": "phi",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "partial_rotary_factor": c["partial_rotary_factor"],
        "qk_layernorm": False,
        "resid_pdrop": 0.1,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.37.0",
        "use_cache": True,
        "vocab_size": c["vocab_size"],
    }


def build_model():
    from transformers import PhiConfig, PhiForCausalLM

    cfg = phi2_style_config_json()
    kw = {k: v for k, v in cfg.items()
          if k not in ("_name_or_path", "architectures", "torch_dtype", "transformers_version",
                       "rope_scaling", "model_type")}  # fmt: skip
    torch.manual_seed(SEED)
    model = PhiForCausalLM(PhiConfig(**kw)).to(torch.float32).eval()
    return model


def save_model(model, out_dir):
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(phi2_style_config_json(), f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": EOS, "eos_token_id": EOS,
                   "transformers_version": "4.37.0"}, f, indent=2)  # fmt: skip
        f.write("\n")
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)  # safetensors creates files 0600
    # The tiny fixture tokenizer, if present, so the directory looks like a full checkpoint
    # (the benchmark itself feeds random token ids and never tokenizes).
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(fixtures, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save-dir", help="also write the random model here (config.json + fp32 model.safetensors)")
    args = ap.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    model = build_model()
    if args.save_dir:
        save_model(model, args.save_dir)

    g = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(0, BENCH_CONFIG["vocab_size"], (1, args.prompt_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    n = args.new_tokens

    def generate():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            use_cache=True,
            eos_token_id=EOS,
            pad_token_id=EOS,
        )
        assert out.shape[1] == args.prompt_len + n, out.shape
        return out

    times = []
    with torch.inference_mode():
        generate()  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            generate()
            times.append(time.perf_counter() - t0)

    med = statistics.median(times)
    print(json.dumps({
        "impl": "hf-transformers",
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "decode_tokens_per_s": round(n / med, 3),
        "times_s": [round(t, 4) for t in times],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
