#!/usr/bin/env python3
"""Regenerate the numbers the README quotes from the commands that produce them, so they cannot rot silently.

    tools/demo.sh && python tools/readme_numbers.py --demo-run runs/gpt_tiny --write   # the demo's eval block
    python tools/readme_numbers.py --check-example --write                             # the --check example
    python tools/readme_numbers.py --check-example                                     # differ? exit 1

Each block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers in README.md. Without --write
the tool prints the regenerated block and exits 1 when it differs from the README's (tests run the fast one,
``--check-example``, on every CI run; the demo block needs a 3-minute demo run).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECK_ARGS = ["--config", "configs/gpt_7b.toml", "--check", "--set", "plan.gpu=h100", "parallel.zero_stage=1",
              "parallel.activation_checkpointing=none"]
CHECK_WORLD = "8"


def demo_block(run_dir: Path) -> str:
    """The demo's evaluations and downstream scores as ``summarize`` prints them, and the first -> last validation
    loss."""
    from pretrain.metrics import summarize

    lines = [line.strip() for line in summarize(run_dir).splitlines()
             if line.strip().startswith(("eval", "val loss", "tasks"))]
    if len(lines) < 2:
        raise SystemExit(f"error: {run_dir} has fewer than two evaluations: run tools/demo.sh first")
    return "```\n" + "\n".join(lines) + "\n```"


def check_block() -> str:
    """``--check`` refusing a 7B layout that does not fit 8 H100s, and naming the one that does."""
    done = subprocess.run([sys.executable, "-m", "pretrain.train", *CHECK_ARGS], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "WORLD_SIZE": CHECK_WORLD}, timeout=300)
    shown = [line for line in (done.stdout + done.stderr).splitlines()
             if line.startswith(("predicted memory", "error:"))]
    command = f"$ WORLD_SIZE={CHECK_WORLD} python -m pretrain.train {' '.join(CHECK_ARGS)}"
    return "```\n" + "\n".join([command, *shown]) + "\n```"


def replace_block(text: str, name: str, block: str) -> tuple[str, str]:
    """(README with the block replaced, the block it had)."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n)(.*?)(\n<!-- {name}:end -->)", re.S)
    match = pattern.search(text)
    if not match:
        raise SystemExit(f"error: README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> block")
    return text[:match.start(2)] + block + text[match.end(2):], match.group(2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-run", help="a finished tools/demo.sh run dir: regenerate the demo block from it")
    parser.add_argument("--check-example", action="store_true", help="regenerate the --check example block")
    parser.add_argument("--write", action="store_true", help="write the regenerated blocks into README.md")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="the file to check or write (README.md)")
    args = parser.parse_args(argv)
    if not (args.demo_run or args.check_example):
        parser.error("name a block: --demo-run DIR and/or --check-example")
    readme = Path(args.readme)
    text = readme.read_text()
    differs = False
    wanted = [("demo", lambda: demo_block(Path(args.demo_run)))] if args.demo_run else []
    wanted += [("check-example", check_block)] if args.check_example else []
    for name, make in wanted:
        block = make()
        text, old = replace_block(text, name, block)
        if old != block:
            differs = True
            print(f"README.md's {name} block differs from what the command prints now:\n{block}")
    if args.write:
        tmp = readme.with_name(readme.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(readme)
        return 0
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
