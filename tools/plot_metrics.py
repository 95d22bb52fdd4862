#!/usr/bin/env python3
"""Plot training runs (RUN_DIR/metrics.jsonl) or kernel benchmark CSVs (tools/bench_kernels.py), several overlaid.

    python tools/plot_metrics.py runs/gpt_tiny --out plot.png
    python tools/plot_metrics.py runs/a runs/b --out compare.png          # runs overlaid, labelled by directory
    python tools/plot_metrics.py runs/bench_kernels/kernels-*.csv --out kernels.png

Runs: four panels — train loss with validation loss, learning rate, tokens/s (global), MFU when known (else
step time) — and, when a run logged downstream tasks (``eval.tasks``), two more: their accuracies
(``<task>_acc``, ``<task>_acc_norm``) and perplexities (``<task>_ppl``). Kernel CSVs: one panel per (op, shape), a bar per implementation and file (ms, lower is better).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.metrics import read_metrics  # noqa: E402


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def last_per_step(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, keeping the last record of a step (a resumed run logs some steps twice)."""
    values = {r["step"]: r[key] for r in records if r.get(key) is not None}
    steps = sorted(values)
    return steps, [values[s] for s in steps]


def downstream_keys(runs: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """(accuracy keys, perplexity keys) of the downstream tasks any run logged."""
    keys = {k for records in runs.values() for r in records for k in r}
    return (sorted(k for k in keys if k.endswith(("_acc", "_acc_norm"))),
            sorted(k for k in keys if k.endswith("_ppl") and k != "val_ppl"))


def plot_runs(runs: dict[str, list[dict]], out: Path, plt) -> None:
    accs, ppls = downstream_keys(runs)
    fig, axes = plt.subplots(3 if accs or ppls else 2, 2, figsize=(12, 12 if accs or ppls else 8))
    (loss_ax, lr_ax), (tps_ax, mfu_ax) = axes[:2]
    if accs or ppls:
        acc_ax, ppl_ax = axes[2]
        for label, records in runs.items():
            for key in accs:
                acc_ax.plot(*last_per_step(records, key), "o-", label=f"{label} {key}", markersize=3)
            for key in ppls:
                ppl_ax.plot(*last_per_step(records, key), "o-", label=f"{label} {key}", markersize=3)
        acc_ax.set_title("downstream accuracy")
        ppl_ax.set_title("downstream perplexity")
    any_mfu = any(r.get("mfu") is not None for records in runs.values() for r in records)
    for label, records in runs.items():
        steps, loss = last_per_step(records, "loss")
        line, = loss_ax.plot(steps, loss, label=f"{label} train", linewidth=1)
        steps, val = last_per_step(records, "val_loss")
        if steps:
            loss_ax.plot(steps, val, "o--", color=line.get_color(), label=f"{label} val", markersize=3)
        lr_ax.plot(*last_per_step(records, "lr"), label=label, linewidth=1)
        tps_ax.plot(*last_per_step(records, "tokens_per_s"), label=label, linewidth=1)
        if any_mfu:
            steps, mfu = last_per_step(records, "mfu")
            mfu_ax.plot(steps, [100 * m for m in mfu], label=label, linewidth=1)
        else:
            mfu_ax.plot(*last_per_step(records, "step_time_s"), label=label, linewidth=1)
    loss_ax.set_title("loss")
    lr_ax.set_title("learning rate")
    tps_ax.set_title("tokens / s (global)")
    mfu_ax.set_title("MFU (%)" if any_mfu else "step time (s); MFU unknown on this device")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def plot_kernels(tables: dict[str, list[dict]], out: Path, plt) -> None:
    rows = [(label, r) for label, table in tables.items() for r in table]
    groups = sorted({(r["op"], r["shape"]) for _, r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.6 + 0.35 * max(
        sum(1 for _, r in rows if (r["op"], r["shape"]) == g) for g in groups) * len(groups) + 0.8 * len(groups)),
        squeeze=False)
    for ax, (op, shape) in zip(axes[:, 0], groups):
        mine = [(label, r) for label, r in rows if (r["op"], r["shape"]) == (op, shape)]
        names = [r["impl"] if len(tables) == 1 else f"{r['impl']} ({label})" for label, r in mine]
        ax.barh(names, [float(r["ms"]) for _, r in mine])
        ax.set_title(f"{op} {shape} (ms, lower is better)", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="run directories (metrics.jsonl inside) or kernel CSV files")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        return fail(f"--out {out} must end in .png")
    if not out.parent.is_dir():
        return fail(f"the directory of --out {out} does not exist")
    csvs = [Path(p) for p in args.inputs if p.endswith(".csv")]
    runs = [Path(p) for p in args.inputs if not p.endswith(".csv")]
    if csvs and runs:
        return fail("give run directories or kernel CSVs, not both")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return fail("plotting needs matplotlib: pip install -e '.[plot]'")

    partial = out.with_name(out.name + ".partial.png")
    if runs:
        data = {}
        for path in runs:
            if not (path / "metrics.jsonl").is_file():
                return fail(f"{path} has no metrics.jsonl (is it a run directory?)")
            try:
                records = read_metrics(path)
            except ValueError as exc:
                return fail(str(exc))
            if not any("loss" in r for r in records):
                return fail(f"{path / 'metrics.jsonl'} has no logged steps")
            data[_label(path, runs)] = records
        plot_runs(data, partial, plt)
        summary = ", ".join(f"{label}: {sum('loss' in r for r in records)} steps" for label, records in data.items())
    else:
        tables = {}
        for path in csvs:
            if not path.is_file():
                return fail(f"no such CSV: {path}")
            with open(path, newline="") as f:
                table = list(csv.DictReader(f))
            missing = {"op", "shape", "impl", "ms"} - set(table[0] if table else {})
            if not table or missing:
                return fail(f"{path} is not a kernel benchmark CSV (needs columns op, shape, impl, ms)")
            if any(not math.isfinite(float(r["ms"])) for r in table):
                return fail(f"{path} has a non-numeric ms value")
            tables[path.stem] = table
        plot_kernels(tables, partial, plt)
        summary = ", ".join(f"{label}: {len(t)} rows" for label, t in tables.items())
    partial.replace(out)
    print(f"wrote {out} ({summary})")
    return 0


def _label(path: Path, all_paths: list[Path]) -> str:
    names = [p.resolve().name for p in all_paths]
    return path.resolve().name if names.count(path.resolve().name) == 1 else str(path)


if __name__ == "__main__":
    sys.exit(main())
