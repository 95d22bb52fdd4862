#!/usr/bin/env python3
"""Training-step benchmark: our llama-flavour GPT against transformers' LlamaForCausalLM of the identical
config — same weights, same batch, same AdamW, fp32 — with the runs interleaved in one process so both see the
same machine state. Prints median step time, tokens/s and the ratio (goal: ours <= 1.0x HF's step time).

    python tools/bench_step.py                 # gpt_tiny shape on CPU
    python tools/bench_step.py --config configs/gpt_125m.toml --set model.flavor=llama --batch 2 --seq 512
    python tools/bench_step.py --config configs/gpt_1b.toml --batch 2 --dtype bf16 --json out.json   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.models import build_model  # noqa: E402


def hf_llama(cfg, ours):
    try:
        import transformers
    except ImportError:
        raise SystemExit("error: this benchmark needs transformers: pip install -e '.[hf]'") from None
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg)
    state = {(k if k == "lm_head.weight" else "model." + k): v for k, v in ours.state_dict().items()}
    model.load_state_dict(state, strict=False)
    return model


def make_step(model, forward, device, dtype: str = "fp32"):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(tokens, targets):
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            logits = forward(model, tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gpt_tiny.toml")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=0, help="sequence length (default: model.seq_len)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: both models under torch.autocast (weights and AdamW stay fp32)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides).model
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.arch != "gpt" or cfg.flavor != "llama":
        print("error: the HF comparison needs a llama-flavour gpt config", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_model(cfg).to(device)
    hf = hf_llama(cfg, ours).to(device)
    seq = args.seq or cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    # the logit check runs as the steps do (bf16 autocast under --dtype bf16): an fp32 pass through the Triton
    # attention is a build no target compiles well (spills, no tensor cores) and would only cost the loan time
    half = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), half:
        diff = (ours(inputs).float() - hf(inputs).logits.float()).abs().max().item()
    steps = {"pretrain": make_step(ours, lambda m, x: m(x), device, args.dtype),
             "hf": make_step(hf, lambda m, x: m(x).logits, device, args.dtype)}
    times = {name: [] for name in steps}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():  # interleaved: both see the same machine state
            sync()
            start = time.perf_counter()
            step(inputs, targets)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    n_tokens = args.batch * seq
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M params, batch {args.batch} x {seq}, "
          f"max |logit diff| {diff:.1e}")
    for name, t in median.items():
        print(f"{name:>9}: median step {1e3 * t:8.1f} ms  {n_tokens / t:10.0f} tokens/s")
    ratio = median['pretrain'] / median['hf']
    print(f"ratio pretrain/hf step time: {ratio:.3f} (goal <= 1.0)")
    if args.json:
        result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "dtype": args.dtype, "kernels": cfg.kernels, "batch": args.batch,
                  "seq": seq, "params": sum(p.numel() for p in ours.parameters()), "max_logit_diff": diff,
                  "tokens_per_s": {name: n_tokens / t for name, t in median.items()},
                  "step_time_ratio": ratio}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
