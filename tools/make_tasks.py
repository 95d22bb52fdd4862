#!/usr/bin/env python3
"""Make two small downstream task files (pretrain/downstream.py's JSONL) from a prepared dataset's held-out split:

    python tools/make_tasks.py --data data/builtin --out data/builtin/tasks [--items 200] [--seed 0]

- ``<out>/next_line.jsonl`` (multiple choice): the three lines before a line and its first word as the context;
  the rest of that line against the rests of three other lines of the split (HellaSwag's shape on code);
- ``<out>/last_word.jsonl`` (last word, LAMBADA's shape): a line and the lines before it, its last identifier to
  predict;
- ``<out>/next_line.yaml``, ``<out>/last_word.yaml``: the same tasks for lm-evaluation-harness
  (``lm_eval --include_path <out> --tasks next_line``; ``pretrain.downstream.write_task_yaml``).

The documents are the split's own (``val`` by default: text the run never trains on), decoded with the data's
tokenizer; the choice of lines and the order of the choices are seeded. Written to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.errors import UserError  # noqa: E402

WORD = re.compile(r"^(\s*\S+)(\s.*\S)$")  # a line's first word and a non-empty rest
LAST = re.compile(r"^(.*\W)([A-Za-z_][A-Za-z_0-9]{2,})$")  # a line ending in an identifier of 3+ characters


def documents(data: str, split: str) -> list[str]:
    from pretrain.data.documents import ShardDataset

    ds = ShardDataset(data, split)
    tok = ds.tokenizer()
    return [tok.decode(ds.document(s, d).tolist()) for s in range(ds.num_shards) for d in range(len(ds.lengths(s)))]


def make(texts: list[str], items: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    windows = []  # (three lines before, the line)
    for text in texts:
        lines = [line for line in text.splitlines() if line.strip()]
        windows += [(lines[i - 3:i], lines[i]) for i in range(3, len(lines))]
    rng.shuffle(windows)
    choice_items, word_items = [], []
    splits = [(before, WORD.match(line)) for before, line in windows]
    splits = [(before, m.group(1), m.group(2)) for before, m in splits if m and 8 <= len(m.group(2)) <= 80]
    rests = [rest for _, _, rest in splits]
    for before, first, rest in splits:
        if len(choice_items) == items:
            break
        others = rng.sample(rests, 3)
        if rest in others:
            continue
        choices = [rest, *others]
        rng.shuffle(choices)
        choice_items.append({"context": "\n".join(before + [first]), "choices": choices, "gold": choices.index(rest)})
    for before, line in windows:
        if len(word_items) == items:
            break
        m = LAST.match(line.rstrip())
        if m and len(m.group(1).strip()) >= 4:
            word_items.append({"context": "\n".join(before + [m.group(1)]), "continuation": m.group(2)})
    return choice_items, word_items


def write(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a directory made by tools/prepare_data.py")
    parser.add_argument("--out", required=True, help="the directory to write the two task files into")
    parser.add_argument("--split", default="val", choices=["val", "train"], help="whose documents (default val)")
    parser.add_argument("--items", type=int, default=200, help="items a task at most (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.items < 1:
            raise UserError(f"--items must be >= 1, got {args.items}")
        choice_items, word_items = make(documents(args.data, args.split), args.items, args.seed)
        if not choice_items or not word_items:
            raise UserError(f"{args.data} ({args.split}) has too few lines to make the tasks")
    except (UserError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pretrain.downstream import write_task_yaml

    write(out / "next_line.jsonl", choice_items)
    write(out / "last_word.jsonl", word_items)
    write_task_yaml(out / "next_line.jsonl", "choice")  # lm-eval's local-file tasks of the same files
    write_task_yaml(out / "last_word.jsonl", "last_word")
    print(f"wrote {out / 'next_line.jsonl'} ({len(choice_items)} items) and {out / 'last_word.jsonl'} "
          f"({len(word_items)} items), with their lm-eval task YAMLs (--include_path {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
