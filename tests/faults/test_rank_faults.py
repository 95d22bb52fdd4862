"""Faults only several ranks can have (gloo, real torchrun launches): every rank must train the same config."""

import os
import subprocess
import sys

from .helpers import ROOT, TINY

SKEWED = """
import os, sys
sys.path.insert(0, {root!r})
from pretrain.train import main
rank = os.environ["RANK"]
skew = {skew!r}
sys.exit(main(["--set", *{tiny!r}, *skew.get(rank, []), "logging.run_dir=" + sys.argv[1]]))
"""


def launch_skewed(tmp_path, skew: dict[str, list[str]]):
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED.format(root=str(ROOT), skew=skew, tiny=[*TINY, "train.steps=3"]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_ranks_started_with_different_configs_are_refused_naming_the_keys(tmp_path):
    done = launch_skewed(tmp_path, {"1": ["optim.lr=2e-3", "train.steps=4"]})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0] == ("error: the ranks were started with different configs: optim.lr = 0.0003 on rank 0; 0.002 "
                         "on rank 1 (and train.steps); launch every rank with the same --config and --set")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    same = launch_skewed(tmp_path, {})
    assert same.returncode == 0, same.stderr[-3000:]
