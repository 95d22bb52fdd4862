"""python -m pretrain.plan: the planner's command line.

    python -m pretrain.plan --config configs/gpt_7b.toml --gpus 64 --gpu h100 [--gpus-per-node 8]
                            [--global-batch-tokens 4M] [--seq 8192] [--set K=V ...] [--explain N] [--meter]
    python -m pretrain.plan memory --config C [--set K=V ...] --world N      # per-rank bytes, JSON
    python -m pretrain.plan validate [--points FILE.csv]                     # against published runs
    python -m pretrain.plan fit [--points FILE.csv]                          # refit the speed constants
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import sys
from pathlib import Path

from pretrain.config import ConfigError, load_config
from pretrain.plan.points import CALIBRATION, load
from pretrain.plan.speed import FITTED, estimate, fit, median_p90

GIB = 2**30


def validate(path: Path, out=None) -> tuple[float, float, int, int]:
    out = out or sys.stdout
    points, skipped = load(path)
    if not points:
        raise ValueError(f"no predictable point in {path} ({len(skipped)} skipped)")
    print(f"{'point':60s} {'published':>9s} {'predicted':>9s} {'error':>7s}", file=out)
    errors = []
    for p in points:
        predicted = estimate(p.shape, p.layout, p.gpu, p.seq, p.global_batch).tflops_per_gpu
        error = predicted / p.tflops - 1
        errors.append(error)
        print(f"{p.id[:60]:60s} {p.tflops:9.1f} {predicted:9.1f} {100 * error:+6.1f}%", file=out)
    for reason, n in collections.Counter(why for _, why in skipped).most_common():
        print(f"skipped {n}: {reason}", file=out)
    for what, n in collections.Counter(a for p in points for a in p.assumed).most_common():
        print(f"assumed {n}: {what}", file=out)
    stated = [e for e, p in zip(errors, points) if not p.assumed]
    if len(stated) < len(points):
        s_med, s_p90 = median_p90(stated)
        print(f"median |error| {100 * s_med:.1f}% p90 {100 * s_p90:.1f}% over the {len(stated)} points that "
              "state everything the model reads", file=out)
    med, p90 = median_p90(errors)
    print(f"median |error| {100 * med:.1f}% p90 {100 * p90:.1f}% over {len(points)} points ({len(skipped)} skipped)",
          file=out)
    return med, p90, len(points), len(skipped)


def _tokens(text: str) -> int:
    t = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise ValueError(f"--global-batch-tokens {text!r} is not a number of tokens (e.g. 4M, 1048576)") from None


def _points(args) -> int:
    path = Path(args.points)
    if not path.is_file():
        raise ValueError(f"points file not found: {path}")
    try:
        if args.command == "validate":
            validate(path)
            return 0
        points, skipped = load(path)
        if not points:
            raise ValueError(f"no predictable point in {path} ({len(skipped)} skipped)")
        constants, med, p90 = fit(points, FITTED)
        print(constants)
        print(f"median |error| {100 * med:.1f}% p90 {100 * p90:.1f}% over {len(points)} points")
        return 0
    except (KeyError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} is not a CSV of published points ({exc})") from None


def _memory(args) -> int:
    from pretrain.plan.memory import estimate_memory

    cfg = load_config(args.config, args.set)
    print(json.dumps(estimate_memory(cfg, args.world).as_dict(), indent=2))
    return 0


def _search(args) -> int:
    from pretrain.plan.hardware import gpu
    from pretrain.plan.search import describe, minimal_overrides, search

    overrides = list(args.set)
    if args.seq:
        overrides.append(f"model.seq_len={args.seq}")
    cfg = load_config(args.config, overrides)
    toml = json.loads(args.gpu_spec) if args.gpu_spec else None
    device = gpu(args.gpu, toml)
    if args.gpus_per_node:
        from dataclasses import replace

        device = replace(device, gpus_per_node=args.gpus_per_node)
    tokens = _tokens(args.global_batch_tokens)
    if tokens < cfg.model.seq_len:
        raise ValueError(f"--global-batch-tokens {tokens} is less than one sequence of {cfg.model.seq_len}")
    constants = FITTED
    if args.meter:  # this model's own non-matmul bytes instead of the constant fitted on published runs
        import os
        from dataclasses import replace

        os.environ.setdefault("TRITON_INTERPRET", "1")  # the meter runs Triton ops dry, on the CPU
        from pretrain.plan.roofline import memory_bytes_per_element
        from pretrain.plan.step_cost import measure

        measured = memory_bytes_per_element(measure(cfg), cfg)
        print(f"memory_bytes: {measured:.0f} per activation element and layer, measured by the step-cost meter "
              f"(model.kernels = {cfg.model.kernels}; fitted on published runs: {FITTED.memory_bytes:.0f})")
        constants = replace(FITTED, memory_bytes=measured)
    print(f"searching the layouts of {args.config or 'defaults'} on {args.gpus} × {device.name} ...", flush=True)
    options, tried = search(cfg, args.gpus, device, tokens, top=args.top, constants=constants)
    if not tried:
        raise ValueError(f"no layout of {args.gpus} GPUs splits {tokens // cfg.model.seq_len} sequences of "
                         f"{cfg.model.seq_len} evenly over its data-parallel ranks: change --global-batch-tokens "
                         f"or --gpus")
    print(f"{args.config or 'defaults'} on {args.gpus} × {device.name} ({device.gpus_per_node} per node), "
          f"{tokens:,} tokens a step of {cfg.model.seq_len}: {tried} layouts tried, {len(options)} shown that fit")
    if not options:
        print(f"error: no layout of {args.gpus} {device.name} fits: more GPUs or a smaller model", file=sys.stderr)
        return 2
    print(f"{'#':>2} {'layout (pp…i: interleaved; mb × accumulation)':58s} {'tokens/s':>12s} {'MFU':>6s} {'step s':>7s} {'GiB/GPU':>8s}")
    for i, o in enumerate(options, 1):
        print(f"{i:2d} {describe(o):58s} {o.speed.tokens_per_s:12,.0f} {100 * o.speed.mfu:5.1f}% "
              f"{o.speed.step_s:7.2f} {o.memory.total_bytes / GIB:8.1f}")
    if args.explain > len(options):
        raise ValueError(f"--explain {args.explain}: only {len(options)} layout(s) shown (raise --top to see more)")
    pick = options[(args.explain or 1) - 1]
    print(f"\nuse #{options.index(pick) + 1}: --set {' '.join(minimal_overrides(pick, cfg))}")
    if args.explain:
        print(f"\n#{args.explain}: step {pick.speed.step_s:.3f} s")
        for part, seconds in pick.speed.parts.items():
            print(f"  {part:8s} {seconds:8.3f} s")
        print("  memory per GPU (GiB): " + ", ".join(f"{k[:-6]} {v / GIB:.2f}" for k, v in
                                                   pick.memory.as_dict().items() if k.endswith("_bytes")))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("validate", "fit", "memory") else "search"
    parser = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if command != "search":
        parser.add_argument("command")
    if command in ("validate", "fit"):
        parser.add_argument("--points", default=str(CALIBRATION),
                            help="CSV of published runs (default: the calibration file in pretrain/plan/data/)")
    else:
        parser.add_argument("--config", help="TOML preset (configs/*.toml)")
        parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                            help="config overrides, as for pretrain.train")
    if command == "memory":
        parser.add_argument("--world", type=int, required=True, help="ranks (GPUs) of the job")
    if command == "search":
        parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
        parser.add_argument("--gpu", required=True, help="a100_40gb, a100_80gb, h100, h200, b200, gb200, gb300")
        parser.add_argument("--gpu-spec", default="", help='JSON of GPU fields to override, e.g. \'{"network_gb_s": 25}\'')
        parser.add_argument("--gpus-per-node", type=int, default=0,
                            help="GPUs per node, the most TP may use (default: the GPU type's, 8 for h100)")
        parser.add_argument("--global-batch-tokens", default="4M",
                            help="tokens per optimizer step, fixed across layouts (4M, 512k, 4194304; default 4M)")
        parser.add_argument("--seq", type=int, default=0, help="sequence length (default: the config's model.seq_len)")
        parser.add_argument("--top", type=int, default=10, help="layouts to show (default 10)")
        parser.add_argument("--explain", type=int, default=0, metavar="N", help="the breakdown of layout N")
        parser.add_argument("--meter", action="store_true",
                            help="HBM bytes of this model measured by the step-cost meter (~30 s) instead of the "
                                 "constant fitted on published runs")
    args = parser.parse_args(argv)
    args.command = command
    try:
        if command in ("validate", "fit"):
            return _points(args)
        if command == "memory":
            if args.world < 1:
                raise ValueError(f"--world must be >= 1, got {args.world}")
            return _memory(args)
        for flag, value, least in (("--gpus", args.gpus, 1), ("--top", args.top, 1), ("--explain", args.explain, 0),
                                   ("--gpus-per-node", args.gpus_per_node, 0), ("--seq", args.seq, 0)):
            if value < least:
                raise ValueError(f"{flag} must be >= {least}, got {value}")
        return _search(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
