import json

import pytest
import torch

from pretrain.checkpoint.manager import CheckpointError, CheckpointManager
from pretrain.distributed import DistInfo
from pretrain.train import build_trainer, main
from pretrain.trainer import lr_at, param_groups

from .conftest import on_one_batch, tiny_config


def run(cfg, stop_after=None):
    trainer = build_trainer(cfg, DistInfo())
    return trainer, trainer.fit(stop_after)


def test_overfits_one_batch(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=60", "schedule.warmup_steps=5", "optim.weight_decay=0")
    trainer = build_trainer(cfg, DistInfo())
    on_one_batch(trainer)
    losses = trainer.fit()
    assert losses[0] > 3.5 and losses[-1] < 0.5, (losses[0], losses[-1])


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_same_seed_same_losses_bitwise(tmp_path, arch):
    _, a = run(tiny_config(tmp_path / "a", arch=arch))
    _, b = run(tiny_config(tmp_path / "b", arch=arch))
    assert a == b
    _, c = run(tiny_config(tmp_path / "c", "train.seed=7", arch=arch))
    assert a != c


def first_step_grads(cfg):
    trainer = build_trainer(cfg, DistInfo())
    trainer.optimizer.zero_grad = lambda set_to_none=True: None  # keep the step's gradients to compare
    result = trainer.train_step()
    return result.loss, {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_accumulation_equals_one_big_batch(tmp_path, arch):
    # gradients of the step (before Adam, whose 1/sqrt(v) magnifies round-off where v is tiny) and losses
    loss_big, grads_big = first_step_grads(tiny_config(tmp_path, "train.micro_batch_size=8", arch=arch))
    loss_acc, grads_acc = first_step_grads(tiny_config(tmp_path, "train.micro_batch_size=2", "train.grad_accum=4",
                                                       arch=arch))
    assert abs(loss_big - loss_acc) < 1e-6
    for name, grad in grads_big.items():
        torch.testing.assert_close(grad, grads_acc[name], rtol=0, atol=1e-6, msg=name)
    _, big_losses = run(tiny_config(tmp_path / "a", "train.steps=3", "train.micro_batch_size=8", arch=arch))
    _, acc_losses = run(tiny_config(tmp_path / "b", "train.steps=3", "train.micro_batch_size=2",
                                    "train.grad_accum=4", arch=arch))
    assert max(abs(a - b) for a, b in zip(big_losses, acc_losses)) < 1e-5
    # a different global batch really does change the gradient (the check above can fail)
    _, grads_other = first_step_grads(tiny_config(tmp_path, "train.micro_batch_size=4", arch=arch))
    assert any((grads_other[n] - g).abs().max() > 1e-4 for n, g in grads_big.items())


class RaggedTargets:
    """Ignores every target below 20: each sample, so each micro-batch, keeps a different number of them."""

    def __init__(self, data):
        self.data = data

    def next_batch(self):
        batch = dict(self.data.next_batch())
        batch["targets"] = batch["targets"].masked_fill(batch["targets"] < 20, -100)
        return batch


def test_accumulation_normalises_by_the_count_over_all_micro_batches(tmp_path):
    """Micro-batches with unequal target counts: the step's loss is the mean over every target of the step, so a
    scale taken from one micro-batch's count (× grad_accum) would differ."""
    def grads(*overrides):
        trainer = build_trainer(tiny_config(tmp_path, *overrides), DistInfo())
        trainer.data = RaggedTargets(trainer.data)
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        result = trainer.train_step()
        return result.loss, {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()}

    loss_big, grads_big = grads("train.micro_batch_size=8")
    loss_acc, grads_acc = grads("train.micro_batch_size=2", "train.grad_accum=4")
    assert abs(loss_big - loss_acc) < 1e-6
    for name, grad in grads_big.items():
        torch.testing.assert_close(grad, grads_acc[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch, source", [("gpt", "synthetic"), ("bert", "synthetic"), ("gpt", "shards"),
                                          ("bert", "shards")])
def test_resume_is_exact(tmp_path, prepared, arch, source):
    common = ["train.steps=10", "model.dropout=0.1", f"data.source={source}", f"data.path={prepared}",
              "model.vocab_size=512"]
    _, straight = run(tiny_config(tmp_path / "a", *common, arch=arch))
    ckpt = tmp_path / "b" / "ckpt"
    _, first = run(tiny_config(tmp_path / "b", *common, "checkpoint.interval=5", f"checkpoint.dir={ckpt}",
                               arch=arch), stop_after=5)
    assert (ckpt / "latest").read_text() == "step-00000005"
    trainer, resumed = run(tiny_config(tmp_path / "b", *common, "checkpoint.interval=5", f"checkpoint.dir={ckpt}",
                                       arch=arch))
    assert resumed == straight  # the full history: 5 restored + 5 trained after resume
    assert first == straight[:5]
    assert trainer.step == 10


def test_resume_refuses_a_different_model(tmp_path):
    ckpt = tmp_path / "ckpt"
    run(tiny_config(tmp_path, "train.steps=2", "checkpoint.interval=2", f"checkpoint.dir={ckpt}"))
    with pytest.raises(CheckpointError, match=r"different model \(model.d_model = 32 there, 64 here\)"):
        run(tiny_config(tmp_path, "train.steps=4", "model.d_model=64", f"checkpoint.dir={ckpt}"))
    assert (ckpt / "step-00000002" / "manifest.json").is_file()  # nothing lost


def test_resume_cli_error_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    run(tiny_config(tmp_path, "train.steps=2", "checkpoint.interval=2", f"checkpoint.dir={ckpt}"))
    args = ["--set", "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64",
            "model.seq_len=16", "train.steps=4", "model.n_layers=3", f"checkpoint.dir={ckpt}",
            f"logging.run_dir={tmp_path / 'run'}", "logging.tensorboard=false", "data.source=synthetic"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different model (model.n_layers = 2 there, 3 here)" in err[0]


def test_incomplete_checkpoint_is_never_loaded(tmp_path):
    ckpt = tmp_path / "ckpt"
    run(tiny_config(tmp_path, "train.steps=4", "checkpoint.interval=2", f"checkpoint.dir={ckpt}",
                    "checkpoint.keep_last=5"))
    (ckpt / "step-00000004" / "manifest.json").unlink()  # as if the process died before the manifest
    (ckpt / "step-00000006.tmp").mkdir()
    manager = CheckpointManager(ckpt)
    assert manager.latest().name == "step-00000002"
    assert not (ckpt / "step-00000006.tmp").exists()


def test_keep_last_prunes(tmp_path):
    ckpt = tmp_path / "ckpt"
    run(tiny_config(tmp_path, "train.steps=6", "checkpoint.interval=1", f"checkpoint.dir={ckpt}",
                    "checkpoint.keep_last=2"))
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000005", "step-00000006"]
    manifest = json.loads((ckpt / "step-00000006" / "manifest.json").read_text())
    assert {"config.toml", "state.json", ".metadata"} <= set(manifest["files"])


def test_metrics_and_eval_written(tmp_path):
    cfg = tiny_config(tmp_path, "logging.interval=2", "eval.interval=3", "eval.steps=2", "logging.tensorboard=true")
    run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6] and [r["step"] for r in evals] == [0, 3, 6]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "mem_rss_gb"} <= set(steps[0])
    assert steps[0]["mfu"] is None  # no peak known for a CPU
    assert evals[0]["val_ppl"] == pytest.approx(2.718281828 ** evals[0]["val_loss"], rel=1e-6)
    assert evals[0]["val_loss"] == pytest.approx(4.16, abs=0.1)  # ln(64): an untrained model guesses uniformly
    assert (tmp_path / "run" / "config.toml").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_mfu_uses_the_configured_peak(tmp_path):
    run(tiny_config(tmp_path, "logging.interval=3", "logging.peak_tflops=0.001"))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    from pretrain.models.flops import flops_per_token
    expected = flops_per_token(tiny_config(tmp_path).model) * record["tokens_per_s"] / 1e9
    assert record["mfu"] == pytest.approx(expected, rel=1e-9)


def test_lr_schedules(tmp_path):
    def lrs(*extra):
        cfg = tiny_config(tmp_path, "train.steps=100", "schedule.warmup_steps=10", "optim.lr=1.0",
                          "optim.min_lr=0.1", *extra)
        return [lr_at(s, cfg) for s in range(100)]

    cosine = lrs()
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[10] == pytest.approx(1.0) and cosine[99] == pytest.approx(0.1, abs=1e-3)
    assert cosine[55] == pytest.approx(0.55, abs=0.01)  # halfway through the decay
    linear = lrs("schedule.decay=linear")
    assert linear[55] == pytest.approx(1.0 - 0.9 * 45 / 90)
    wsd = lrs("schedule.decay=wsd", "schedule.decay_fraction=0.2")
    assert wsd[79] == 1.0 and wsd[90] == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    # a decay fraction reaching into the warmup: the decay starts when the warmup ends, never before
    early = lrs("schedule.decay=wsd", "schedule.decay_fraction=0.95")
    assert early[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]) and early[10] == 1.0
    assert early[55] == pytest.approx(1.0 - 0.9 * 45 / 90) and early[99] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("source", ["synthetic", "shards"])
def test_loader_restores_a_position_into_one_that_already_produced_batches(tmp_path, prepared, source):
    """load_state_dict on a loader that has run ahead (a resume into a live trainer, or a rollback) continues from
    the restored position, not from where it was."""
    from pretrain.data import build_stream

    cfg = tiny_config(tmp_path, f"data.source={source}", f"data.path={prepared}", "model.vocab_size=512")
    first = build_stream(cfg, "train", 0, 1)
    for _ in range(2):
        first.next_batch()
    saved = first.state_dict()
    expected = [first.next_batch()["tokens"] for _ in range(3)]
    ahead = build_stream(cfg, "train", 0, 1)
    for _ in range(5):  # further than the saved position
        ahead.next_batch()
    ahead.load_state_dict(saved)
    got = [ahead.next_batch()["tokens"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_weight_decay_skips_norms_biases_embeddings(tmp_path):
    from pretrain.models import build_model

    model = build_model(tiny_config(tmp_path, flavor="gpt2").model)
    decay, other = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "embed_tokens.weight" not in decayed and "embed_positions.weight" not in decayed
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert "layers.0.self_attn.q_proj.weight" in decayed
    assert other["weight_decay"] == 0.0 and len(decay["params"]) + len(other["params"]) == len(names)


def test_summary_covers_first_last_and_evals(tmp_path):
    from pretrain.metrics import summarize

    run(tiny_config(tmp_path, "train.steps=20", "logging.interval=1", "eval.interval=10", "eval.steps=1"))
    text = summarize(tmp_path / "run")
    assert "step      1 " in text and "step     20 " in text
    assert [line.split()[1] for line in text.splitlines() if line.strip().startswith("eval")] == ["0", "10", "20"]


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path):
    """train.compile = true compiles each block (inductor, ~30 s here): same losses as eager."""
    runs = []
    for compiled in ("false", "true"):
        cfg = tiny_config(tmp_path / compiled, f"train.compile={compiled}", "train.steps=3")
        trainer = build_trainer(cfg, DistInfo())
        runs.append(trainer.fit())
        if compiled == "true":
            assert any(type(b).__name__ == "OptimizedModule" for b in trainer.raw_model.layers.values())
    assert max(abs(a - b) for a, b in zip(*runs)) < 1e-5, runs
