"""The batch scripts in slurm/ on a real SLURM cluster: tools/local_slurm.sh starts one on this machine (two
nodes, node1 and node2, each running its own slurmd) and stops it afterwards.

Every job is `sbatch slurm/gpt_1b.sh` with a micro GPT on synthetic data through EXTRA_ARGS, 2 nodes × 2
processes, gloo: the reference run as on a GPU cluster (--gpus-per-node=2 of the nodes' fake GPUs, one process per
GPU by default; nothing can use them, so the processes train on the CPU), the others as on CPU nodes
(--gpus-per-node=0, PROCS_PER_NODE=2). The runs are compared with an
uninterrupted run step for step, exactly: on CPU a resumed run is bit-identical to one that never stopped.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
MICRO = ["data.source=synthetic", "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
         "model.vocab_size=64", "model.seq_len=16", "train.micro_batch_size=4", "eval.interval=0",
         "logging.interval=1", "logging.tensorboard=false", "schedule.warmup_steps=1", "checkpoint.interval=10",
         "logging.heartbeat_s=0"]


def _free_port_block(n: int) -> int:
    for base in range(17000, 18000, 10):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    pytest.skip("no free block of ports for the local SLURM cluster")


class Cluster:
    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.env = {**os.environ, "LOCAL_SLURM_DIR": str(state_dir), "LOCAL_SLURM_PORT": str(_free_port_block(3)),
                    "SLURM_CONF": str(state_dir / "slurm.conf"),
                    # the batch scripts run the python on PATH, as a user's activated environment
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def script(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "tools" / "local_slurm.sh"), action], env=self.env,
                              capture_output=True, text=True, timeout=300)

    def submit(self, out_dir: Path | None, run_dir: Path, extra=(), steps: int = STEPS, sbatch_args=(), gpus: int = 0,
               **env) -> str:
        """sbatch slurm/gpt_1b.sh from the repository root; the log goes to ``out_dir`` (None: the script's
        default, logs/ in the checkout)."""
        job_env = {**self.env, "CONFIG": str(ROOT / "configs" / "gpt_tiny.toml"), "RUN_DIR": str(run_dir),
                   **({} if gpus else {"PROCS_PER_NODE": "2"}), "EXTRA_ARGS": " ".join([*MICRO, f"train.steps={steps}", *extra]), **env}
        output = [] if out_dir is None else [f"--output={out_dir}/%x-%j.out"]
        cmd = ["sbatch", "--parsable", "--nodes=2", f"--gpus-per-node={gpus}", "--cpus-per-task=2", *output, *sbatch_args,
               "slurm/gpt_1b.sh"]
        done = subprocess.run(cmd, cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                             text=True, timeout=30).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, timeout: float = 180.0) -> dict[str, str]:
        """Until the job ends. (A requeued job waits the credential lifetime before it starts again: 10 s on
        the local cluster, 120 s by default. Releasing it sooner races the nodes' clean-up of its first run,
        and SLURM then fails it: "Job credential revoked".)"""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], env=self.env, timeout=30)
        raise AssertionError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    if not shutil.which("unshare"):
        pytest.skip("no unshare (util-linux) for the cluster's private /etc/hosts")
    state = Path(tempfile.mkdtemp(prefix="pretrain-slurm-"))
    c = Cluster(state)
    started = c.script("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield c
    finally:
        stopped = c.script("stop")
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def trajectory(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Loss and grad norm of every step, the last logged value of each (a restarted run logs some twice)."""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in metrics(run_dir) if "loss" in r}


def log_of(out_dir: Path, job_id: str) -> str:
    return (out_dir / f"gpt_1b-{job_id}.out").read_text()


def wait_for_step(run_dir: Path, step: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in metrics(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"run {run_dir} did not reach step {step} in {timeout:.0f} s")


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """An uninterrupted run: the trajectory the interrupted ones must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    job = cluster.submit(None, tmp / "run", gpus=2)  # the script's own --output=logs/%x-%j.out
    info = cluster.wait(job)
    log = ROOT / "logs" / f"gpt_1b-{job}.out"
    if log.is_file():
        shutil.move(log, tmp / log.name)
    return job, info, tmp


def test_sbatch_trains_on_two_nodes(cluster, reference):
    job, info, tmp = reference
    log = log_of(tmp, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert f"job {job} (restart 0): 2 nodes × 2 processes" in log and "launcher torchrun" in log
    assert "4 processes = dp_replicate 1 × dp_shard 4 × tp 1 × pp 1" in log
    traj = trajectory(tmp / "run")
    assert sorted(traj) == list(range(1, STEPS + 1))
    losses = [traj[s][0] for s in sorted(traj)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    checkpoints = tmp / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{STEPS:08d}"
    assert (checkpoints / f"step-{STEPS:08d}").is_dir()
    assert f"done: {STEPS} steps" in log and "training finished" in log


def test_usr1_saves_requeues_and_resumes_bit_identically(cluster, reference, tmp_path):
    job = cluster.submit(tmp_path, tmp_path / "run")
    wait_for_step(tmp_path / "run", 5)
    # what SLURM does 180 s before the time limit (--signal=B:USR1@180): signal the batch shell only
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True, timeout=30)
    info = cluster.wait(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "got SIGUSR1: asking every rank to save and stop" in log
    saved = [line for line in log.splitlines() if line.startswith("stop signal: saved checkpoint")]
    assert len(saved) == 1, log
    step = int(saved[0].split(" at step ")[1].split(";")[0])
    assert 5 <= step < STEPS
    assert f"requeueing job {job}" in log and f"job {job} (restart 1)" in log
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step-{step:08d}'} at step {step}" in log
    assert trajectory(tmp_path / "run") == trajectory(reference[2] / "run")


@pytest.mark.slow
def test_killed_rank_restarts_workers_and_resumes(cluster, reference, tmp_path):
    run = tmp_path / "run"
    job = cluster.submit(tmp_path, run)
    wait_for_step(run, 13)  # past the checkpoint at step 10
    victim = _worker_pid(job, rank=3)  # a rank on the second node
    os.kill(victim, signal.SIGKILL)
    info = cluster.wait(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    resumed = [line for line in log.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].rsplit(" at step ", 1)[1] in ("10", "20"), log
    logged = [r["step"] for r in metrics(run) if "loss" in r]
    assert len(logged) > STEPS  # the steps after the checkpoint ran twice
    assert trajectory(run) == trajectory(reference[2] / "run")


def _worker_pid(job: str, rank: int) -> int:
    """The training process of ``rank`` in ``job``, found by its environment (never by name)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return int(proc.name)
    raise AssertionError(f"no process of rank {rank} in job {job}")


@pytest.mark.slow  # ~55 s under the cluster; the in-process twin is tests/test_fault_tolerance.py's
def test_nonfinite_step_skipped_and_streak_aborts(cluster, tmp_path):
    once = cluster.submit(tmp_path, tmp_path / "once", ["train.inject_nan_steps=[7]"], steps=20)
    streak = cluster.submit(tmp_path, tmp_path / "streak",
                            ["train.inject_nan_steps=[5,6]", "train.max_nonfinite_steps=2"], steps=20,
                            MAX_RESTARTS="1")
    info = cluster.wait(once)
    assert info["JobState"] == "COMPLETED", log_of(tmp_path, once)
    rows = {r["step"]: r for r in metrics(tmp_path / "once") if "loss" in r}
    assert rows[7]["loss"] != rows[7]["loss"]  # NaN
    assert rows[6]["skipped_updates"] == 0 and rows[7]["skipped_updates"] == 1 and rows[20]["skipped_updates"] == 1
    assert "step 7: non-finite loss (nan)" in log_of(tmp_path, once)

    info = cluster.wait(streak)
    log = log_of(tmp_path, streak)
    assert info["JobState"] == "FAILED", log
    line = "error: loss or gradient norm non-finite for 2 steps in a row (up to step 6): lower optim.lr or check the data"
    assert log.count(line) == 2 * 4, log  # every rank, the first try and the one restart from the checkpoint
    assert "training failed: exit status 1" in log
    assert max(r["step"] for r in metrics(tmp_path / "streak")) < 6


def test_fails_fast_with_one_line(cluster, tmp_path):
    cases = {
        "config": ({"CONFIG": str(tmp_path / "missing.toml")}, (),
                   f"error: config file not found: {tmp_path / 'missing.toml'}"),
        "gpus": ({"GPUS_PER_NODE": "4"}, (), "error: GPUS_PER_NODE=4 but the allocation has 2 GPUs per node"),
        # a node held --exclusive comes with all its GPUs whatever --gpus-per-node says: share it to get none
        "procs": ({"PROCS_PER_NODE": ""}, ("--exclusive=user",), "error: no GPUs in the allocation and no PROCS_PER_NODE"),
        "run_dir": ({"RUN_DIR": "/proc/no-such-run"}, (), "error: run dir /proc/no-such-run is not writable"),
        "layout": ({}, (), "error: world size 4 is not divisible by dp_replicate × tp × pp = 1 × 3 × 1 = 3"),
    }
    jobs = {}
    for name, (env, args, _) in cases.items():
        extra = ["parallel.tp=3"] if name == "layout" else []
        jobs[name] = cluster.submit(tmp_path, tmp_path / f"run-{name}", extra, sbatch_args=args,
                                    gpus=2 if name == "gpus" else 0, **env)
    for name, job in jobs.items():
        info = cluster.wait(job)
        log = log_of(tmp_path, job)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", log
        assert log.strip().splitlines()[-1].startswith(cases[name][2]), log
        assert "job " + job + " (restart" not in log  # nothing was launched
        assert not (tmp_path / f"run-{name}" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_srun_launcher_without_torchrun(cluster, reference, tmp_path):
    """One srun task per process: the trainers read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; a stop signal
    saves, requeues and resumes as under torchrun."""
    job = cluster.submit(tmp_path, tmp_path / "run", LAUNCHER="srun")
    wait_for_step(tmp_path / "run", 5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True, timeout=30)
    info = cluster.wait(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "launcher srun" in log and f"requeueing job {job}" in log and f"job {job} (restart 1)" in log
    assert trajectory(tmp_path / "run") == trajectory(reference[2] / "run")
