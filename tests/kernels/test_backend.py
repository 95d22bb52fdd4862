"""A micro model trained with every op from Triton (interpreter on CPU) follows the torch backend's losses."""

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.distributed import DistInfo
from pretrain.train import build_trainer
from tests.conftest import tiny_config

pytest.importorskip("triton")


@pytest.mark.parametrize("arch, flavor", [("gpt", "llama"), ("gpt", "gpt2"), ("bert", "llama")])
def test_triton_backend_trains_like_torch(tmp_path, arch, flavor):
    runs = {}
    for kernels in ("torch", "triton"):
        cfg = tiny_config(tmp_path / kernels, f"model.kernels={kernels}", "train.steps=3", "train.micro_batch_size=2",
                          "model.tie_embeddings=false", "eval.interval=0", arch=arch, flavor=flavor)
        runs[kernels] = build_trainer(cfg, DistInfo()).fit()
    assert max(abs(a - b) for a, b in zip(runs["torch"], runs["triton"])) < 1e-4, runs


def test_per_op_choice_and_bad_choices(tmp_path):
    cfg = tiny_config(tmp_path, 'model.kernels="rms_norm,cross_entropy"', "train.steps=2", "eval.interval=0",
                      "train.micro_batch_size=2")
    trainer = build_trainer(cfg, DistInfo())
    assert trainer.raw_model.ops.triton == {"rms_norm", "cross_entropy"}
    assert trainer.raw_model.ops.attention.__module__ == "pretrain.models.ops"
    assert len(trainer.fit()) == 2
    with pytest.raises(ConfigError, match="expected torch, triton, or a comma-separated list"):
        load_config(None, ['model.kernels="attention,flash"'])
    with pytest.raises(ConfigError, match="has no dropout"):
        load_config(None, ["model.kernels=triton", "model.dropout=0.1"])


def test_triton_optimizer_trains_like_torch_adamw(tmp_path):
    runs = {}
    for impl in ("torch", "triton"):
        cfg = tiny_config(tmp_path / impl, f"optim.impl={impl}", "train.steps=4", "eval.interval=0")
        trainer = build_trainer(cfg, DistInfo())
        runs[impl] = trainer.fit()
        assert type(trainer.optimizer).__name__ == ("FusedAdamW" if impl == "triton" else "AdamW")
    assert max(abs(a - b) for a, b in zip(runs["torch"], runs["triton"])) < 1e-5, runs


def test_apex_missing_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="needs NVIDIA apex, which is not installed"):
        build_trainer(tiny_config(tmp_path, "optim.impl=apex"), DistInfo())
