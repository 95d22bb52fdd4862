"""Run inside the harness's launches (``checks``): in-loop downstream scores (pretrain/downstream.py) under parallel
layouts equal one process's exactly — the same items, the same sums — and print one line per layout:
``DOWNSTREAM name ok|FAILED ...``. The model is each layout's freshly built one (seeded: the same weights as the
one-process reference, as the harness's layouts), scored before any step; a training step after the scoring must
still run (a pipeline's schedule, FSDP's state)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.distributed import DistInfo  # noqa: E402
from pretrain.downstream import Downstream  # noqa: E402
from pretrain.parallel.dims import ParallelDims  # noqa: E402
from pretrain.train import build_trainer  # noqa: E402
from tests.parallel.harness import BASE, MOE  # noqa: E402

LAYOUTS = {  # world 2 (name -> overrides)
    "dp2": ["train.micro_batch_size=4"],
    "zero3_2": ["train.micro_batch_size=4", "parallel.zero_stage=3"],
    "tp2_sp": ["train.micro_batch_size=8", "parallel.tp=2"],
    "moe_ep2": ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=2", *MOE],
    "pp2_1f1b": ["train.micro_batch_size=4", "parallel.pp=2", "parallel.n_microbatches=2"],
    "cp2_ring": ["train.micro_batch_size=8", "parallel.cp=2"],
    "cp2_alltoall": ["train.micro_batch_size=8", "parallel.cp=2", "parallel.cp_impl=alltoall"],
    "ds_zero3_2": ["train.micro_batch_size=4", "parallel.engine=deepspeed", "parallel.zero_stage=3"],
}


class Letters:
    """A tokenizer of letters (1..26), space 27, anything else 28; EOS 0 — inside the tiny model's vocab of 64."""
    eos_id = 0

    def encode(self, text):
        return [ord(c) - 96 if "a" <= c <= "z" else 27 if c == " " else 28 for c in text]


def task_files(root: Path) -> list[str]:
    words = ["apple", "river", "stone", "cloud", "eagle", "flame", "grape", "house", "light", "mango", "night"]
    mc = [{"context": f"the {words[i % 11]} and the", "choices": [f" {w}" for w in words[i % 3:i % 3 + 4]],
           "gold": i % 4} for i in range(13)]  # 13 items: uneven over 2 ranks
    lw = [{"context": f"a {w} is a", "continuation": f" {words[(j + 1) % 11]}"} for j, w in enumerate(words)]
    paths = []
    for name, records in (("mc", mc), ("lw", lw)):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(str(path))
    return paths


def scores(overrides: list[str], info: DistInfo, run_dir: str, paths: list[str], step: bool = True
           ) -> tuple[dict[str, float], bool]:
    """(the scores, whether a training step after them still runs and gives a finite loss — if ``step``)."""
    from pretrain.config import load_config

    cfg = load_config(None, [*BASE, *overrides, f"logging.run_dir={run_dir}"])
    trainer = build_trainer(cfg, info, ParallelDims.from_config(cfg, info.world_size))
    trainer.downstream = Downstream(paths, Letters(), cfg.model.vocab_size, cfg.model.seq_len, 3)
    values = trainer.downstream_scores()
    return values, not step or bool(torch.isfinite(torch.tensor(trainer.train_step().loss)))


def checks() -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        return False
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if rank == 0:
            task_files(root)
        paths = [str(root / "mc.jsonl"), str(root / "lw.jsonl")]
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)  # one directory for both ranks (the same machine)
        paths = [p.replace(tmp, shared[0]) for p in paths]
        dist.barrier()
        references: dict[tuple, dict] = {}  # one one-process reference per model shape, not per layout
        for name, overrides in LAYOUTS.items():
            arch = tuple(o for o in overrides if o.startswith("model."))
            if arch not in references:
                references[arch] = scores(["train.micro_batch_size=8", *arch], DistInfo(0, 1, 0, torch.device("cpu")),
                                          f"{tmp}/ref-{len(references)}-{rank}", paths, step=False)[0]
            reference = references[arch]
            got, trains_on = scores(overrides, DistInfo(rank, world, rank, torch.device("cpu")), f"{tmp}/{name}", paths)
            exact = all(got[k] == reference[k] for k in got if not k.endswith("_ppl"))
            close = all(abs(got[k] / reference[k] - 1) <= 1e-6 for k in got if k.endswith("_ppl"))
            ok = exact and close and trains_on and set(got) == {"mc_acc", "mc_acc_norm", "lw_acc", "lw_ppl"}
            failed |= not ok
            if rank == 0:
                print(f"DOWNSTREAM {name} {'ok' if ok else 'FAILED'} {json.dumps(got)} reference "
                      f"{json.dumps(reference)}", flush=True)
        dist.barrier()
    return failed
