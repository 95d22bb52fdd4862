#!/usr/bin/env python3
"""Write OUT/gpu_report.md from what tools/gpu_check.sh left in OUT (also: the device facts, and a self-test).

    python tools/gpu_report.py OUT                 # OUT/gpu_report.md
    python tools/gpu_report.py --facts OUT/facts.json
    python tools/gpu_report.py --self-test         # builds a report from made-up inputs; exit 0 when it works
    python tools/gpu_report.py --check-configs "LABEL|ARGS" ...  # pretrain.train ARGS --check, in one process

Training figures are medians over the steps after the first WARMUP (5): compilation, allocator warm-up and the
first Triton launches stay out of them. The goals are the project's: gpt_1b >= 55 % MFU on one H200 (dense bf16
peak from the datasheet table in pretrain/metrics.py) and >= 1.3x the tokens/s of transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.metrics import read_metrics  # noqa: E402

WARMUP = 5
MFU_GOAL = 0.55
HF_GOAL = 1.3
FP8_GOAL = 1.3
FP8_PAIRS = {"gpt_1b": ("train-torch", "train-fp8"), "gpt_7b shapes, 4 layers": ("gpt7b-bf16", "gpt7b-fp8")}
TRAIN_VARIANTS = {"torch": "torch kernels, torch AdamW", "triton": "Triton kernels + FusedAdamW",
                  "compiled": "Triton kernels + FusedAdamW + torch.compile"}


def facts() -> dict:
    """Device, clocks, power limit, driver and library versions."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    query = "name,driver_version,clocks.max.sm,clocks.max.mem,clocks.sm,power.limit,power.max_limit"
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.splitlines()[0]
        out["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in smi.split(","))))
    except (OSError, subprocess.SubprocessError, IndexError):
        out["nvidia_smi"] = None
    return out


def train_summary(run_dir: Path) -> dict | None:
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    steps = [r for r in read_metrics(run_dir) if "loss" in r and r["step"] > WARMUP]
    if not steps:
        return None
    median = lambda key: statistics.median(r[key] for r in steps) if all(r.get(key) is not None for r in steps) \
        else None
    return {"steps": len(steps), "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"),
            "step_time_s": median("step_time_s"), "data_wait_s": median("data_wait_s"),
            "mem_gib": max((r.get("mem_allocated_gb") or r.get("mem_rss_gb") or 0) for r in steps),
            "final_loss": steps[-1]["loss"]}


def kernel_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "kernels").glob("*.csv")) + sorted((out / "kernels-docs").glob("*.csv")):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def fmt(value, spec: str, unit: str = "") -> str:
    return "—" if value is None else format(value, spec) + unit


def build(out: Path) -> str:
    lines = ["# GPU check", ""]
    facts_path = out / "facts.json"
    f = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    smi = f.get("nvidia_smi") or {}
    lines += [f"- device: {f.get('device', 'unknown')} ({f.get('memory_gib', '?')} GiB, {f.get('sm_count', '?')} SMs, "
              f"capability {f.get('capability', '?')})",
              f"- clocks: SM {smi.get('clocks.sm', '?')} (max {smi.get('clocks.max.sm', '?')}), memory max "
              f"{smi.get('clocks.max.mem', '?')}; power limit {smi.get('power.limit', '?')}; driver "
              f"{smi.get('driver_version', '?')}",
              f"- torch {f.get('torch', '?')} (CUDA {f.get('cuda', '?')}), triton {f.get('triton', '?')}, "
              f"transformers {f.get('transformers', '?')}, python {f.get('python', '?')}", ""]

    steps_path = out / "steps.tsv"
    if steps_path.is_file():
        lines += ["| step | exit | seconds | note |", "|---|---|---|---|"]
        for row in steps_path.read_text().splitlines():
            name, rc, secs, note = (row.split("\t") + [""] * 4)[:4]
            lines.append(f"| {name} | {rc} | {secs} | {note} |")
        lines.append("")
    tests_log = out / "gpu_tests.log"
    if tests_log.is_file():
        summary = [line for line in tests_log.read_text().splitlines()
                   if " in " in line and any(w in line for w in ("passed", "failed", "skipped", "error"))]
        lines += [f"gpu tests: {summary[-1].strip('= ') if summary else 'no summary line (see gpu_tests.log)'}", ""]

    results = {}
    lines += ["## gpt_1b on one GPU (30 steps, synthetic data, bf16, 4 × 2 × 4096 tokens a step)", "",
              "| variant | tokens/s | MFU | step | data wait | peak mem GiB | loss at end |", "|---|---|---|---|---|---|---|"]
    for key, label in TRAIN_VARIANTS.items():
        s = train_summary(out / f"train-{key}")
        results[key] = s
        if s is None:
            lines.append(f"| {label} | not run | | | | | |")
            continue
        lines.append(f"| {label} | {s['tokens_per_s']:,.0f} | {fmt(s['mfu'] and 100 * s['mfu'], '.1f', ' %')} | "
                     f"{1e3 * s['step_time_s']:.0f} ms | {fmt(s['data_wait_s'] and 1e3 * s['data_wait_s'], '.1f', ' ms')} | "
                     f"{s['mem_gib']:.1f} | {s['final_loss']:.3f} |")
    lines.append("")
    deepseek = train_summary(out / "train-deepseek")
    lines += ["## deepseek_tiny on one GPU (MLA, group-routed MoE, 2 MTP depths; 20 steps, bf16, Triton kernels)", "",
              "not run" if deepseek is None else
              "{:,.0f} tokens/s, loss at end {:.3f}, peak {:.1f} GiB".format(
                  deepseek["tokens_per_s"], deepseek["final_loss"], deepseek["mem_gib"]), ""]

    hf = {}
    for key in ("torch", "triton"):
        path = out / f"hf-{key}.json"
        if path.is_file():
            hf[key] = json.loads(path.read_text())
    if hf:
        lines += ["## against transformers' LlamaForCausalLM (same config and weights, SDPA, fused AdamW, bf16 "
                  "autocast, interleaved)", "", "| our kernels | ours tokens/s | HF tokens/s | ours / HF | max logit diff |",
                  "|---|---|---|---|---|"]
        for key, r in hf.items():
            t = r["tokens_per_s"]
            lines.append(f"| {key} | {t['pretrain']:,.0f} | {t['hf']:,.0f} | {t['pretrain'] / t['hf']:.2f}× | "
                         f"{r['max_logit_diff']:.1e} |")
        lines.append("")

    fp8 = {}
    for label, (base, quick) in FP8_PAIRS.items():
        a, b = train_summary(out / base), train_summary(out / quick)
        if a and b and a["tokens_per_s"] and b["tokens_per_s"]:
            fp8[label] = (a, b)
    if fp8:
        lines += ["## FP8 (train.fp8 = tensorwise, torchao) against bf16, torch kernels", "",
                  "| model | bf16 tokens/s | fp8 tokens/s | fp8 / bf16 | bf16 loss at end | fp8 loss at end | "
                  "peak mem GiB bf16 / fp8 |", "|---|---|---|---|---|---|---|"]
        for label, (a, b) in fp8.items():
            lines.append(f"| {label} | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
                         f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}× | {a['final_loss']:.3f} | "
                         f"{b['final_loss']:.3f} | {a['mem_gib']:.1f} / {b['mem_gib']:.1f} |")
        lines.append("")
    meter = meter_rows(out, f.get("device", ""), results)
    if meter:
        lines += ["## the step-cost meter's prediction beside the measured gpt_1b step (calibrates "
                  "pretrain.plan.hardware.METER)", "",
                  "| kernels | predicted step | measured step | measured / predicted | predicted MFU | measured MFU |",
                  "|---|---|---|---|---|---|"] + meter + [""]
    best_mfu = max((s["mfu"] for s in results.values() if s and s["mfu"] is not None), default=None)
    best_hf = max((r["tokens_per_s"]["pretrain"] / r["tokens_per_s"]["hf"] for r in hf.values()), default=None)
    lines += ["## goals", "", "| goal | measured | met |", "|---|---|---|",
              f"| gpt_1b MFU ≥ {100 * MFU_GOAL:.0f} % | {fmt(best_mfu and 100 * best_mfu, '.1f', ' %')} | "
              f"{'—' if best_mfu is None else ('yes' if best_mfu >= MFU_GOAL else 'no')} |",
              f"| tokens/s ≥ {HF_GOAL}× HF Llama | {fmt(best_hf, '.2f', '×')} | "
              f"{'—' if best_hf is None else ('yes' if best_hf >= HF_GOAL else 'no')} |"]
    for label, (a, b) in fp8.items():
        ratio = b["tokens_per_s"] / a["tokens_per_s"]
        lines.append(f"| {label}: fp8 ≥ {FP8_GOAL}× bf16 tokens/s | {ratio:.2f}× | {'yes' if ratio >= FP8_GOAL else 'no'} |")
    lines.append("")

    rows = kernel_rows(out)
    if rows:
        lines += ["## kernels (tools/bench_kernels.py --op all, bf16, then attention with --doc-len: shapes ending "
                  "docsN pack documents of N tokens, TFLOP/s of useful work; ms, lower is better)", "",
                  "| op | shape | impl | ms | TFLOP/s | GB/s | peak MiB |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']} | {r['tflops']} | {r['gbs']} | "
                         f"{r.get('peak_mem_mib', '')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def meter_rows(out: Path, device: str, results: dict) -> list[str]:
    """One row per kernel set: tools/step_cost.py's roofline step for this GPU beside train-<kernels>'s median."""
    from pretrain.plan.hardware import gpu

    try:
        name = gpu(device).name
    except ValueError:
        name = "h100"  # an unknown card: read against the H100 (the row says so)
    rows = []
    for key in ("triton", "torch"):
        path, measured = out / f"meter-{key}.json", results.get(key)
        if not path.is_file() or path.stat().st_size == 0:
            continue
        rep = json.loads(path.read_text())
        predicted = rep["roofline_step_s"].get(name)
        step = measured and measured["step_time_s"]
        ratio = step / predicted if step and predicted else None
        rows.append(f"| {key} ({name}) | {fmt(predicted, '.3f', ' s')} | {fmt(step, '.3f', ' s')} | "
                    f"{fmt(ratio, '.2f', '×')} | {fmt(100 * rep['roofline_mfu'][name], '.1f', ' %')} | "
                    f"{fmt(measured and measured['mfu'] and 100 * measured['mfu'], '.1f', ' %')} |")
    return rows


def write(out: Path) -> Path:
    report = out / "gpu_report.md"
    partial = out / "gpu_report.md.partial"
    partial.write_text(build(out))
    partial.replace(report)
    return report


def self_test() -> int:
    """A report from made-up inputs of every kind must carry their numbers through."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "facts.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6"}))
        (out / "gpu_tests.log").write_text("....\n4 passed, 44 deselected in 31.02s\n")
        (out / "steps.tsv").write_text("train_torch\t0\t61\t\ntrain_compiled\tskipped\t0\tbudget\n")
        run = out / "train-triton"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "loss": 10.0 - i / 10, "tokens_per_s": 50000.0 + i, "mfu": 0.5 + i / 1000,
                        "step_time_s": 0.6, "data_wait_s": 0.001, "mem_allocated_gb": 40.0}) + "\n"
            for i in range(1, 31)))
        for name, tps in (("train-torch", 40000.0), ("train-fp8", 56000.0)):
            (out / name).mkdir()
            (out / name / "metrics.jsonl").write_text("".join(
                json.dumps({"step": i, "loss": 9.0, "tokens_per_s": tps, "mfu": 0.4, "step_time_s": 0.6,
                            "data_wait_s": 0.001, "mem_allocated_gb": 30.0}) + "\n" for i in range(1, 31)))
        (out / "hf-triton.json").write_text(json.dumps({"tokens_per_s": {"pretrain": 52000.0, "hf": 40000.0},
                                                        "max_logit_diff": 0.01}))
        (out / "meter-triton.json").write_text(json.dumps({"roofline_step_s": {"h100": 0.5, "h200": 0.48},
                                                           "roofline_mfu": {"h100": 0.6, "h200": 0.62}}))
        (out / "kernels").mkdir()
        (out / "kernels" / "k.csv").write_text("op,shape,impl,ms,tflops,gbs,peak_mem_mib\n"
                                               "attention,b1h16s4096d128,triton,1.5,300,1,10\n")
        text = write(out).read_text()
        expected = ["NVIDIA H200", "| Triton kernels + FusedAdamW | 50,018 | 51.8 % |", "| 1.30× |",
                    "| gpt_1b MFU ≥ 55 % | 51.8 % | no |", "| tokens/s ≥ 1.3× HF Llama | 1.30× | yes |",
                    "| attention | b1h16s4096d128 | triton | 1.5 |", "| train_compiled | skipped | 0 | budget |",
                    "| gpt_1b | 40,000 | 56,000 | 1.40× |", "| gpt_1b: fp8 ≥ 1.3× bf16 tokens/s | 1.40× | yes |", "gpu tests: 4 passed, 44 deselected in 31.02s",
                    "| triton (h200) | 0.480 s | 0.600 s | 1.25× | 62.0 % | 51.8 % |"]
        missing = [e for e in expected if e not in text]
        if missing:
            print(f"report self-test failed: missing {missing}\n{text}", file=sys.stderr)
            return 1
    print("report self-test ok")
    return 0


def checkpoints_outside(out: str, commands: list[str]) -> int:
    """gpu_check's rule: no training step of the plan can write a checkpoint under OUT (a stop signal saves one
    whatever checkpoint.interval says). ``commands``: each step's arguments after ``-m pretrain.train``."""
    import shlex

    from pretrain.config import load_config

    root, bad = Path(out).resolve(), []
    for command in commands:
        words = shlex.split(command)
        config = words[words.index("--config") + 1] if "--config" in words else None
        overrides = [w for w in words[words.index("--set") + 1:] if "=" in w] if "--set" in words else []
        where = Path(load_config(config, overrides).checkpoint_dir).resolve()
        if where == root or root in where.parents:
            bad.append(str(where))
    if bad:
        print(f"checkpoints would land in OUT: {', '.join(bad)}")
        return 1
    print(f"checkpoints outside OUT in all {len(commands)} training steps")
    return 0


def check_configs(entries: list[str]) -> int:
    """The dry run's config checks: each ``LABEL|ARGS`` is ``python -m pretrain.train ARGS --check`` run in this
    one process (torch and the project imported once, not once a config); one ``ok``/``FAIL`` line each."""
    import contextlib
    import io
    import shlex

    from pretrain.train import main as train_main

    failed = 0
    for entry in entries:
        label, _, command = entry.partition("|")
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                code = train_main([*shlex.split(command), "--check"])
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
        lines = captured.getvalue().strip().splitlines() or [""]
        if code == 0:
            print(f"ok    {label}: {lines[-1]}")
        else:
            print(f"FAIL  {label}: " + "\n".join(lines[-3:]))
            failed = 1
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="the directory tools/gpu_check.sh wrote")
    parser.add_argument("--checkpoints-outside", nargs="+", metavar=("OUT", "ARGS"),
                        help="check that no training command (arguments after -m pretrain.train) saves under OUT")
    parser.add_argument("--facts", help="write the device facts to this JSON file and exit")
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("--check-configs", nargs="+", metavar="LABEL|ARGS",
                        help="run python -m pretrain.train ARGS --check for each, in this process")
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test()
    if args.check_configs:
        return check_configs(args.check_configs)
    if args.checkpoints_outside:
        return checkpoints_outside(args.checkpoints_outside[0], args.checkpoints_outside[1:])
    if args.facts:
        path = Path(args.facts)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = facts()
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"{data.get('device', 'no CUDA device')}, torch {data['torch']}, triton {data['triton']}")
        return 0
    if not args.out or not Path(args.out).is_dir():
        print(f"error: {args.out or 'OUT'} is not a directory written by tools/gpu_check.sh", file=sys.stderr)
        return 2
    print(f"wrote {write(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
