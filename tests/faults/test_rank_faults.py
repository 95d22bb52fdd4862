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


def test_a_user_error_before_the_process_group_reaches_the_log_once(tmp_path):
    """Every rank meets the error before any process group exists (CP2 × TP2 without FSDP, 4 ranks): rank 0
    says it at once and the silent ranks stay up long enough for the launcher to stop them after it — before,
    a silent rank often exited first and torchrun killed rank 0 before it printed (no error line at all). An
    error only rank 1 meets (its own model.n_heads) is said by rank 1 itself."""
    layout = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "model.seq_len=16",
              "data.source=synthetic", "parallel.cp=2", "parallel.tp=2", "parallel.zero_stage=0",
              f"logging.run_dir={tmp_path / 'cp_tp'}"]
    everyone = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                               "-m", "pretrain.train", "--set", *layout], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [line for line in everyone.stderr.splitlines() if line.startswith("error:")]
    assert everyone.returncode != 0 and errors == [
        "error: tensor parallelism with data parallelism needs FSDP: set parallel.zero_stage = 2 or 3 (got 0)"], \
        everyone.stderr[-3000:]
    one = launch_skewed(tmp_path, {"1": ["model.n_heads=5"]})
    errors = [line for line in one.stderr.splitlines() if line.startswith("error:")]
    assert one.returncode != 0 and len(errors) == 1 and "model.n_heads (5)" in errors[0], one.stderr[-3000:]
