import os

# before anything imports triton.jit code: kernels run in the interpreter on CPU
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pretrain.config import load_config  # noqa: E402

# tools/test.sh runs the files on every core (pytest-xdist, --dist loadfile: a file stays whole on one worker, its
# module fixtures built once) in collection order; the longest files go first so that short ones fill the tail
LONG_FIRST = ("tests/test_slurm.py", "tests/parallel/test_parallel.py", "tests/kernels/test_compile_gate.py",
              "tests/test_install.py", "tests/test_observability.py", "tests/plan/test_memory.py",
              "tests/checkpoint/test_hf.py", "tests/test_distributed.py", "tests/plan/test_step_cost.py")


def pytest_collection_modifyitems(config, items):
    order = {path: i for i, path in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: order.get(item.nodeid.split("::")[0], len(LONG_FIRST)))  # stable: the rest as found
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """40 standard-library sources: real text, enough for a 512-piece tokenizer."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for path in sorted(root.glob("*.py"))[:40]:
        shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="session")
def prepared(small_corpus, tmp_path_factory) -> Path:
    from pretrain.data.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "ds"
    prepare([str(small_corpus)], out, vocab_size=512, val_fraction=0.1, shard_tokens=20_000, progress=False)
    return out


# the tiny model most tests train: 2 blocks of width 32, 4 heads, 64 tokens, sequences of 16
TINY_MODEL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "model.seq_len=16"]


def tiny_config(tmp_path, *extra, arch="gpt", flavor="llama"):
    return load_config(None, [
        f"model.arch={arch}", f"model.flavor={flavor}", *TINY_MODEL, "train.micro_batch_size=8", "train.steps=6",
        "schedule.warmup_steps=2", "optim.lr=1e-2", "optim.min_lr=1e-3", "logging.interval=0",
        "logging.tensorboard=false", f"logging.run_dir={tmp_path / 'run'}", "data.source=synthetic", *extra,
    ])


def on_one_batch(trainer):
    """Feed ``trainer`` its first batch at every step (to check it can overfit one batch)."""
    batch = trainer.data.next_batch()

    class SameBatch:
        def next_batch(self):
            return batch

    trainer.data = SameBatch()
    return trainer
