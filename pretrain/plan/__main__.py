"""python -m pretrain.plan validate | fit --points FILE.csv (see pretrain/plan/__init__.py)."""

from __future__ import annotations

import argparse
import collections
import csv
import sys
from pathlib import Path

from pretrain.plan.points import CALIBRATION, load
from pretrain.plan.speed import FITTED, estimate, fit, median_p90


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
    med, p90 = median_p90(errors)
    print(f"median |error| {100 * med:.1f}% p90 {100 * p90:.1f}% over {len(points)} points ({len(skipped)} skipped)",
          file=out)
    return med, p90, len(points), len(skipped)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__)
    parser.add_argument("command", choices=["validate", "fit"])
    parser.add_argument("--points", default=str(CALIBRATION),
                        help="CSV of published runs (default: the calibration file shipped in pretrain/plan/data/)")
    args = parser.parse_args(argv)
    path = Path(args.points)
    if not path.is_file():
        print(f"error: points file not found: {path}", file=sys.stderr)
        return 2
    try:
        if args.command == "validate":
            validate(path)
        else:
            points, skipped = load(path)
            if not points:
                print(f"error: no predictable point in {path} ({len(skipped)} skipped)", file=sys.stderr)
                return 2
            constants, med, p90 = fit(points, FITTED)
            print(constants)
            print(f"median |error| {100 * med:.1f}% p90 {100 * p90:.1f}% over {len(points)} points")
    except (KeyError, UnicodeDecodeError, csv.Error) as exc:
        print(f"error: {path} is not a CSV of published points ({exc})", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
