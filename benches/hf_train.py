#!/usr/bin/env python3
"""Training speed of the Python stack (transformers + PEFT [+ bitsandbytes NF4]) on the setup
`phitune bench --train` measures, so the two can run back to back on one machine.

Setup: a Phi with random (seeded) weights, LoRA r=4 / alpha 16 / dropout 0.05 on
q_proj, k_proj, v_proj, dense (PEFT), AdamW (lr 1e-4, eps 1e-8, no weight decay), one
micro-batch of random tokens per optimizer step, causal-LM loss on every token.

    python benches/hf_train.py --config bench|phi-2 [--device cpu|cuda] [--quant none|nf4]
        [--dtype f32|bf16|f16] [--micro-batch 2] [--seq-len 128] [--steps 10] [--warmup-steps 3]
        [--threads N] [--grad-checkpointing] [--weights-dir DIR] [--batches FILE]

"bench" is phi-2's vocabulary and head geometry with hidden 640, 8 heads, 4 layers,
intermediate 2560 (as `phitune bench --config bench`); "phi-2" is microsoft/phi-2's real
configuration. --quant nf4 loads the base through bitsandbytes (NF4, double quant, compute in
--dtype), as the seed recipe does; it needs a CUDA device. The random base is saved to
--weights-dir (a temporary directory by default) and loaded back from there: a second run with
the same --weights-dir skips the initialisation (benches/gpu.sh runs two settings so).

--batches FILE takes the micro-batches `phitune bench --train --data ... --batches-out FILE`
wrote (the same rows and tokens, labels -100 outside the loss, attention mask over the real
tokens, as TRL builds them) instead of random tokens; tokens/s then counts real tokens only.
Packed micro-batches (`--packing`) are fed as TRL's padding-free collator does: position ids
restarting at each example and no attention mask.

Prints one JSON line with the same fields as `phitune bench --train`'s "report":
tokens_per_s (steady state: timed steps only), median step/forward/backward/optimizer seconds,
trainable parameter count, first/last loss, peak memory (CUDA: torch.cuda.max_memory_allocated;
CPU: the process's peak RSS).
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch

BENCH = dict(hidden_size=640, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=4,
             intermediate_size=2560)  # fmt: skip
PHI2 = dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32,
            intermediate_size=10240)  # fmt: skip


def phi_config(sizes):
    import transformers

    return transformers.PhiConfig(
        vocab_size=51200, partial_rotary_factor=0.4, hidden_act="gelu_new", layer_norm_eps=1e-5,
        max_position_embeddings=2048, rope_theta=10000.0, resid_pdrop=0.1, embd_pdrop=0.0,
        attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
        **sizes,
    )  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench", choices=["bench", "phi-2"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quant", default="none", choices=["none", "nf4"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--batches", default=None)
    args = ap.parse_args()

    import peft
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    cuda = args.device.startswith("cuda")
    config = phi_config(BENCH if args.config == "bench" else PHI2)
    if args.quant == "nf4":
        if not cuda:
            sys.exit("--quant nf4 needs --device cuda (bitsandbytes' 4-bit training path)")
        import os
        import tempfile

        tmp = None
        weights = args.weights_dir
        if weights is None:
            tmp = tempfile.TemporaryDirectory()
            weights = tmp.name
        if not os.path.isfile(os.path.join(weights, "config.json")):
            # Initialised on the GPU (seconds, not minutes on the CPU), saved in --dtype.
            with torch.device(args.device):
                model = transformers.PhiForCausalLM(config).to(dtype)
            model.save_pretrained(weights)
            del model
            torch.cuda.empty_cache()
        bnb = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
        model = transformers.PhiForCausalLM.from_pretrained(
            weights, quantization_config=bnb, dtype=dtype, device_map={"": args.device}
        )
        if tmp is not None:
            tmp.cleanup()
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.grad_checkpointing
        )
    else:
        model = transformers.PhiForCausalLM(config).to(dtype).to(args.device)
        if args.grad_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    lora = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "dense"],
    )  # fmt: skip
    model = peft.get_peft_model(model, lora)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, eps=1e-8, weight_decay=0.0
    )

    b, s = args.micro_batch, args.seq_len
    batches = [json.loads(line) for line in open(args.batches)] if args.batches else None
    real_tokens = 0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fwd, bwd, optt, steps = [], [], [], []
    first = last = float("nan")
    for step in range(args.warmup_steps + args.steps):
        if batches:
            hb = batches[step % len(batches)]
            ids = torch.tensor(hb["input_ids"], device=args.device)
            labels = torch.tensor(hb["labels"], device=args.device)
            n_real = sum(hb["lengths"])
            if "segments" in hb:
                # Packed rows: each example's positions restart at 0 and no attention mask, from
                # which transformers builds a block-diagonal causal mask (masking_utils'
                # find_packed_sequence_indices). Padding continues the last example's positions.
                pos = []
                for row in hb["segments"]:
                    p = [j for n in row for j in range(n)]
                    last = row[-1] if row else 0
                    p += range(last, last + ids.shape[1] - len(p))
                    pos.append(p)
                position_ids = torch.tensor(pos, device=args.device)
                mask = None
            else:
                mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(hb["lengths"])[:, None])
                mask = mask.long().to(args.device)
                position_ids = None
        else:
            ids = (torch.arange(b * s) * 7919 + step * 104729 + 13) % config.vocab_size
            ids = labels = ids.reshape(b, s).to(args.device)
            mask = None
            position_ids = None
            n_real = b * s
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels,
                    use_cache=False)
        loss = out.loss.float().item()  # the loss on the host, as the Rust side reads it
        t1 = time.perf_counter()
        out.loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step == 0:
            first = loss
        last = loss
        if step >= args.warmup_steps:
            real_tokens += n_real
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            optt.append(t3 - t2)
            steps.append(t3 - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({
        "impl": "transformers+peft" + ("+bitsandbytes" if args.quant == "nf4" else ""),
        "mode": "train", "device": args.device, "dtype": args.dtype, "quant": args.quant,
        "threads": torch.get_num_threads(), "micro_batch": b, "seq_len": s,
        "grad_checkpointing": args.grad_checkpointing,
        "report": {
            "tokens_per_s": real_tokens / sum(steps),
            "step_s": statistics.median(steps), "forward_s": statistics.median(fwd),
            "backward_s": statistics.median(bwd), "optimizer_s": statistics.median(optt),
            "trainable_params": trainable, "loss_first": first, "loss_last": last,
            "peak_memory_gib": peak, "step_times_s": steps,
        },
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
