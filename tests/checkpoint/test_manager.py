"""Atomic checkpoints: a crash mid-save leaves ``latest`` on the previous one, which loads; manifests carry
checksums that catch corruption; keep-last-k plus every M-th for good."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_model, verify
from pretrain.checkpoint.manager import CheckpointError, CheckpointManager
from pretrain.config import Config, load_config
from pretrain.models import build_model

ROOT = Path(__file__).resolve().parents[2]
CFG = ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "model.seq_len=16"]

CRASHING_SAVE = r"""
import os, sys, torch
import torch.distributed.checkpoint as dcp
sys.path.insert(0, {root!r})
from pretrain.checkpoint import manager
from pretrain.config import load_config
from pretrain.models import build_model
cfg = load_config(None, {cfg!r})
model = build_model(cfg.model)
opt = torch.optim.AdamW(model.parameters())
m = manager.CheckpointManager({directory!r})
m.save(1, model, opt, {{"data": {{"cursor": 8}}}}, cfg.to_toml())
print(repr(sum(float(p.double().sum()) for p in model.parameters())), flush=True)
real_save = dcp.save
def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    os.kill(os.getpid(), 9)  # the process dies with the shards written and no manifest
manager.dcp.save = save_then_die
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
m.save(2, model, opt, {{"data": {{"cursor": 16}}}}, cfg.to_toml())
"""


def test_crash_mid_save_keeps_latest_on_the_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    script = CRASHING_SAVE.format(root=str(ROOT), cfg=CFG, directory=str(directory))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert (directory / "step-00000002.tmp").is_dir() and not (directory / "step-00000002").exists()
    assert (directory / "latest").read_text().strip() == "step-00000001"
    manager = CheckpointManager(directory)  # a restart: the half-written save is cleaned up
    assert not (directory / "step-00000002.tmp").exists()
    assert manager.latest().name == "step-00000001"
    model, _ = load_model(directory)  # exactly the step-1 weights
    assert sum(float(p.double().sum()) for p in model.parameters()) == float(proc.stdout.strip())
    assert json.loads((manager.latest() / "state.json").read_text())["data"] == {"cursor": 8}


def test_manifest_checksums_catch_corruption(tmp_path):
    cfg = load_config(None, CFG)
    model = build_model(cfg.model)
    path = CheckpointManager(tmp_path).save(1, model, torch.optim.AdamW(model.parameters()), {}, cfg.to_toml())
    manifest = json.loads((path / "manifest.json").read_text())
    assert all(len(info["crc32"]) == 8 and info["bytes"] > 0 for info in manifest["files"].values())
    verify(path)
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} does not match its manifest"):
        load_model(path)


def test_keep_last_and_every_mth_for_good(tmp_path):
    cfg: Config = load_config(None, CFG)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 10):
        manager.save(step, model, opt, {}, cfg.to_toml())
    assert [p.name for p in manager.complete_steps()] == ["step-00000004", "step-00000008", "step-00000009"]


def test_async_save_completes_and_resumes_like_sync(tmp_path):
    from pretrain.distributed import DistInfo
    from pretrain.train import build_trainer
    from tests.conftest import tiny_config

    runs = {}
    for mode in ("false", "true"):
        extra = ("checkpoint.interval=2", f"checkpoint.async_save={mode}", "train.steps=4", "eval.interval=0")
        first = build_trainer(tiny_config(tmp_path / mode, *extra), DistInfo())
        first.fit(stop_after=3)
        steps = [p.name for p in first.checkpoints.complete_steps()]
        assert steps == ["step-00000002", "step-00000003"], steps
        verify(first.checkpoints.latest())
        runs[mode] = build_trainer(tiny_config(tmp_path / mode, *extra), DistInfo()).fit()
    assert runs["true"] == runs["false"]


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_each_optimizer_layout_restores_model_and_adam_state_exactly(tmp_path, monkeypatch, layout):
    """Steps written with flattened optimizer keys (every save now) and in the nested layout of earlier releases
    both restore the weights and every Adam moment bit for bit."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from pretrain.checkpoint import manager

    cfg = load_config(None, CFG)

    def trained():
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(torch.randint(0, 64, (2, 16))).float().square().mean().backward()
        opt.step()
        return model, opt

    model, opt = trained()
    if layout == "nested":
        monkeypatch.setattr(manager, "OPTIONS", StateDictOptions())
    path = CheckpointManager(tmp_path).save(1, model, opt, {"data": {}}, cfg.to_toml())
    monkeypatch.undo()
    assert manager._has_flat_optimizer(path) == (layout == "flat")
    torch.manual_seed(1)
    fresh = build_model(cfg.model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert CheckpointManager(tmp_path).load(path, fresh, fresh_opt)["step"] == 1
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], fresh_opt.state[b][key]), (name, key)
