"""Damaged, foreign, hostile and occupied checkpoints: verified before anything in them is unpickled, bad steps
reported and skipped for the newest good one, nothing that was there lost, and one line when nothing can be done."""

import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest

from .helpers import TINY, digest, process, refused, tool, train


def args(run_dir: Path, *extra) -> list[str]:
    return ["--set", *TINY, "train.device=cpu", f"logging.run_dir={run_dir}", "checkpoint.interval=2", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps with complete checkpoints at steps 2 and 4."""
    import _pytest.capture

    run = tmp_path_factory.mktemp("trained") / "run"
    from pretrain.train import main

    assert main(args(run, "train.steps=4")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000004"]
    del _pytest.capture
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def ckpt(run, step):
    return run / "checkpoints" / f"step-{step:08d}"


def resume(run, capsys, *extra):
    return train(args(run, "train.steps=6", *extra), capsys)


def resumed_from(result, step) -> str:
    code, out, err = result
    assert code == 0 and "Traceback" not in out + err, (out, err)
    assert f"resumed from {ckpt(Path(), step).name}" in out or f"step-{step:08d} at step {step}" in out, out
    return out


class Payload:
    """What an attacker drops into a checkpoint: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(step_dir: Path, marker: Path) -> None:
    (step_dir / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def test_pickle_in_latest_metadata_is_never_unpickled(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    poison(ckpt(run, 4), marker)
    out = resumed_from(resume(run, capsys), 2)
    skipped = [line for line in out.splitlines() if line.startswith("checkpoint: skipping")]
    assert len(skipped) == 1 and "step-00000004/.metadata" in skipped[0] and "manifest" in skipped[0], out
    assert "the newest step that verifies" in out
    assert not marker.exists()


def test_every_step_poisoned_is_one_line_and_nothing_runs(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    for step in (2, 4):
        poison(ckpt(run, step), marker)
    before = digest(run / "checkpoints")
    refused(resume(run, capsys), r"no checkpoint in .*checkpoints verifies \(2 tried; newest: .*step-00000004/\.metadata "
                                 r"has \d+ bytes, its manifest says \d+")
    assert not marker.exists()
    assert digest(run / "checkpoints") == before  # reported, not deleted


def test_pickle_with_a_forged_manifest_is_refused_by_the_unpickler(run, tmp_path, capsys):
    """An attacker who rewrites the manifest to match still gets nothing run: .metadata is read with only the
    classes DCP writes there."""
    from pretrain.checkpoint.manager import _checksums

    marker = tmp_path / "pwned"
    step = ckpt(run, 4)
    poison(step, marker)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"] = {name: {"bytes": (step / name).stat().st_size, "crc32": crc}
                         for name, crc in _checksums(step).items() if name != "manifest.json"}
    (step / "manifest.json").write_text(json.dumps(manifest))
    refused(resume(run, capsys), r"\.metadata refers to posix.system, which DCP never writes there: not loaded")
    assert not marker.exists()


def _forge_manifest(step: Path) -> None:
    from pretrain.checkpoint.manager import _checksums

    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"] = {name: {"bytes": (step / name).stat().st_size, "crc32": crc}
                         for name, crc in _checksums(step).items() if name != "manifest.json"}
    (step / "manifest.json").write_text(json.dumps(manifest))


def test_pickle_in_a_dcp_byte_entry_is_never_run_even_with_a_forged_manifest(run, tmp_path, capsys):
    """DCP keeps non-tensor entries (the optimizer's hyper-parameters) as torch.save pickles inside the .distcp
    files and reads them back with weights_only=False: an attacker appends a payload to the shard, points one
    entry's storage record at it (re-pickling .metadata with only DCP's own classes, so that check passes) and
    forges the manifest. The entry is read with weights_only=True: one line naming it, nothing run, and no
    advice to turn the check off."""
    import io

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from pretrain.checkpoint.manager import SafeReader

    marker = tmp_path / "pwned"
    step = ckpt(run, 4)
    metadata = SafeReader(str(step)).read_metadata()
    metadata.storage_meta = None
    entry = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in metadata.storage_data if i.fqn == entry)
    shard = step / metadata.storage_data[index].relative_path
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = _StorageInfo(shard.name, offset, len(payload.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    _forge_manifest(step)
    message = refused(resume(run, capsys), rf"entry {entry} of .*step-00000004 holds a pickle that refers to "
                                           r"posix.system, not plain data: not loaded")
    assert "weights_only" not in message
    assert not marker.exists()


@pytest.mark.parametrize("where", ["../../outside.distcp", "/etc/passwd", "sub/__0_0.distcp"])
def test_a_metadata_storage_path_outside_its_step_is_refused(run, tmp_path, capsys, where):
    """A .metadata whose storage record sends a read outside the step (``..``, an absolute path, a sub-folder),
    even with a forged manifest: one line naming it; nothing is read from there."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from pretrain.checkpoint.manager import SafeReader

    step = ckpt(run, 4)
    metadata = SafeReader(str(step)).read_metadata()
    metadata.storage_meta = None
    index = next(iter(metadata.storage_data))
    info = metadata.storage_data[index]
    metadata.storage_data[index] = _StorageInfo(where, info.offset, info.length)
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    _forge_manifest(step)
    refused(resume(run, capsys), rf"\.metadata points a shard at '{where}', outside its step: not loaded")


def test_a_pickle_in_a_deepspeed_file_is_never_run_on_resume(tmp_path):
    """The DeepSpeed engine reads its own files with torch.load(weights_only=False): a file swapped for a payload
    (and the manifest forged to match) is refused naming the file before DeepSpeed reads it; nothing runs."""
    import sys

    import torch

    run, marker = tmp_path / "run", tmp_path / "pwned"
    ds = ["parallel.engine=deepspeed", "parallel.zero_stage=1"]  # its own processes: DeepSpeed keeps global state
    code, out, err = process([sys.executable, "-m", "pretrain.train", *args(run, "train.steps=2", *ds)])
    assert code == 0, err[-2000:]
    step = ckpt(run, 2)
    target = step / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(Payload(marker), target)
    _forge_manifest(step)
    refused(process([sys.executable, "-m", "pretrain.train", *args(run, "train.steps=4", *ds)]),
            rf"{target} holds a pickle that refers to posix.system, not plain data: not loaded")
    assert not marker.exists()


def _shard(step_dir: Path) -> Path:
    return sorted(step_dir.glob("*.distcp"))[0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "delete_shard", "delete_config", "cut_state",
                                    "garbage_manifest", "list_manifest", "delete_rng", "extra_bytes"])
def test_damaged_latest_falls_back_to_the_older_step(run, capsys, damage):
    step = ckpt(run, 4)
    shard = _shard(step)
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "delete_shard":
        shard.unlink()
    elif damage == "delete_config":
        (step / "config.toml").unlink()
    elif damage == "cut_state":
        (step / "state.json").write_text((step / "state.json").read_text()[:20])
    elif damage == "garbage_manifest":
        (step / "manifest.json").write_text("{not json")
    elif damage == "list_manifest":
        (step / "manifest.json").write_text("[1, 2]")
    elif damage == "delete_rng":
        (step / "rng-rank0.pt").unlink()
    elif damage == "extra_bytes":
        with open(step / "state.json", "a") as f:
            f.write(" ")
    damaged = digest(step)
    out = resumed_from(resume(run, capsys), 2)
    assert "checkpoint: skipping" in out and "step-00000004" in out.split("checkpoint: skipping", 1)[1]
    # the rejected step is kept aside, as it was, and saving step 4 again wrote a new one beside it
    aside = list((run / "checkpoints").glob("step-00000004.rejected-*"))
    assert len(aside) == 1 and digest(aside[0]) == damaged and "failed verification; kept as" in out
    assert (step / "manifest.json").is_file() and digest(step) != damaged


def test_step_without_manifest_is_reported_and_kept(run, capsys):
    (ckpt(run, 4) / "manifest.json").unlink()
    kept = digest(ckpt(run, 4))
    out = resumed_from(resume(run, capsys), 2)
    assert "step-00000004 has no manifest.json" in out and "left in place" in out
    # the run reaches step 4 again: the manifest-less directory is set aside, not replaced
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-00000004.no-manifest")]
    assert len(aside) == 1 and digest(aside[0]) == kept
    assert (ckpt(run, 4) / "manifest.json").is_file()


def test_explicit_resume_of_a_damaged_step_has_no_fallback(run, capsys):
    shard = _shard(ckpt(run, 4))
    shard.write_bytes(shard.read_bytes()[:-1])
    refused(resume(run, capsys, f"checkpoint.resume={ckpt(run, 4)}"),
            r"step-00000004/__0_0.distcp has \d+ bytes, its manifest says \d+ \(truncated\?\)")


@pytest.mark.parametrize("target, message", [
    ("missing", r"checkpoint.resume = .*missing: no such step directory"),
    ("file", r"checkpoint.resume = .*a-file: no such step directory"),
    ("empty", r"is not a checkpoint step \(no manifest.json\)"),
])
def test_explicit_resume_of_something_else(run, tmp_path, capsys, target, message):
    path = {"missing": tmp_path / "missing", "file": tmp_path / "a-file", "empty": tmp_path / "empty"}[target]
    if target == "file":
        path.write_text("x")
    if target == "empty":
        path.mkdir()
    refused(resume(run, capsys, f"checkpoint.resume={path}"), message)


def test_resume_never_refuses_an_occupied_checkpoint_dir(run, capsys):
    before = digest(run / "checkpoints")
    refused(train(args(run, "train.steps=2", "checkpoint.resume=never", "checkpoint.keep_last=1"), capsys),
            r'checkpoint.resume = "never" but .*checkpoints already holds 2 step\(s\) of another run \(newest '
            r"step-00000004\)")
    assert digest(run / "checkpoints") == before


def test_prune_keeps_the_step_just_written_and_latest_names_it(tmp_path):
    import torch

    from pretrain.checkpoint.manager import CheckpointManager, verify
    from pretrain.config import Config

    model = torch.nn.Linear(2, 2)
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(10, model, None, {}, Config().to_toml())
    manager.save(3, model, None, {}, Config().to_toml())  # an older step number written last (a re-run)
    latest = (tmp_path / "latest").read_text().strip()
    assert latest == "step-00000003" and (tmp_path / latest).is_dir()
    verify(tmp_path / latest)


@pytest.mark.parametrize("change, message", [
    (["model.d_model=64"], r"holds checkpoints of a different model \(model.d_model = 32 there, 64 here\)"),
    (["model.n_experts=4", "model.moe_top_k=2"], r"\(model.n_experts = 0 there, 4 here\)"),
    (["model.head_dim=16"], r"\(model.head_size = 8 there, 16 here\)"),
    (["model.qkv_bias=true"], r"\(model.qkv_bias = False there, True here\)"),
    (["optim.name=muon"], r"trained with optim.name = 'adamw', this config has 'muon': the optimizer state does "
                          r"not carry over"),
])
def test_another_model_or_optimizer_in_the_checkpoint_dir(run, capsys, change, message):
    """Resuming across a change that alters a saved tensor or the optimizer state names the key and both values,
    instead of DCP's size-mismatch or missing-key message."""
    before = digest(run / "checkpoints")
    refused(resume(run, capsys, *change), message)
    assert digest(run / "checkpoints") == before


def test_checkpoint_of_another_tokenizer_refuses_the_data(run, capsys, prepared, small_corpus, tmp_path):
    """A checkpoint trained on data of one tokenizer does not continue on data of another."""
    from pretrain.data.prepare import prepare

    state = ckpt(run, 4) / "state.json"
    assert json.loads(state.read_text())["tokenizer_hash"] is None  # synthetic data: no tokenizer
    other = tmp_path / "other"
    prepare([str(small_corpus)], other, vocab_size=600, val_fraction=0.1, shard_tokens=20_000, progress=False)
    first = tmp_path / "first"
    assert train(["--set", *TINY, "train.device=cpu", f"logging.run_dir={first}", "checkpoint.interval=2",
                  "train.steps=2", "data.source=shards", f"data.path={prepared}", "model.vocab_size=640"],
                 capsys)[0] == 0
    refused(train(["--set", *TINY, "train.device=cpu", f"logging.run_dir={first}", "checkpoint.interval=2",
                   "train.steps=4", "data.source=shards", f"data.path={other}", "model.vocab_size=640"], capsys),
            r"was trained on data tokenized with \w{12}, but .*other was prepared with \w{12}")


# --- directories that cannot hold the run: refused before the first step ----------------------------------
def test_checkpoint_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "ckfile").write_text("mine")
    refused(train(args(tmp_path / "run", "train.steps=2", f"checkpoint.dir={tmp_path / 'ckfile'}"), capsys),
            r"checkpoint dir \(checkpoint.dir\) .*ckfile is a file, not a directory")
    assert (tmp_path / "ckfile").read_text() == "mine"
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # not one step trained


def test_run_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "runfile").write_text("mine")
    refused(train(args(tmp_path / "runfile", "train.steps=2"), capsys),
            r"run dir \(logging.run_dir\) .*runfile is a file, not a directory")
    assert (tmp_path / "runfile").read_text() == "mine"


def test_run_dir_below_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    refused(train(args(tmp_path / "f" / "run", "train.steps=2"), capsys), r"is not writable: .*/f is a file")


def test_a_second_run_on_the_same_dir_is_refused_naming_the_holder(run, capsys):
    from pretrain.files import DirLock

    holder = DirLock(run, "run dir")
    holder.acquire()
    try:
        before = digest(run / "checkpoints")
        line = refused(resume(run, capsys), r"run dir \(logging.run_dir\) .*run is in use by another run \(host ")
        assert f"pid {os.getpid()}" in line and socket.gethostname() in line
        assert digest(run / "checkpoints") == before
    finally:
        holder.release()


def test_a_dead_runs_lock_is_taken_over_aloud(run, capsys):
    (run / ".lock").write_text("host elsewhere pid 999999 since 2026-01-01 00:00:00\n")
    out = resumed_from(resume(run, capsys), 4)
    assert "took over the lock of host elsewhere pid 999999" in out
    assert (run / ".lock").read_text() == ""  # released at the end


def test_a_separate_checkpoint_dir_is_locked_too(tmp_path, capsys):
    from pretrain.files import DirLock

    shared = tmp_path / "shared-ckpt"
    holder = DirLock(shared, "checkpoint dir")
    holder.acquire()
    try:
        refused(train(args(tmp_path / "run", "train.steps=2", f"checkpoint.dir={shared}"), capsys),
                r"checkpoint dir \(checkpoint.dir\) .*shared-ckpt is in use by another run")
    finally:
        holder.release()


# --- the disk fails under the save: one line, no partial .tmp, older steps intact ---------------------------
def test_file_size_limit_at_save(run):
    """RLIMIT_FSIZE makes every write past 64 KiB fail (EFBIG), as a full disk fails them (ENOSPC)."""
    import resource

    before = digest(run / "checkpoints")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # noqa: E731
    result = process([os.sys.executable, "-m", "pretrain.train", *args(run, "train.steps=6")], preexec_fn=limit)
    refused(result, r"cannot write checkpoint .*step-00000006.tmp: File too large")
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert digest(run / "checkpoints") == before


def _unshare_available() -> bool:
    return shutil.which("unshare") is not None and process(["unshare", "-rm", "true"])[0] == 0


@pytest.mark.parametrize("fs, message", [
    ("size=160k", r"cannot write checkpoint .*step-00000002.tmp: No space left on device"),
    ("ro", r"run dir \(logging.run_dir\) .* is not writable: Read-only file system"),
])
def test_full_and_read_only_filesystems(tmp_path, fs, message):
    """A real full disk (a 160 KiB tmpfs) and a read-only mount, in a private mount namespace."""
    if not _unshare_available():
        pytest.skip("unshare -rm (user + mount namespaces) is not permitted here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join([f"mount -t tmpfs -o {fs} tmpfs {mnt} &&", os.sys.executable, "-m", "pretrain.train",
                    *[f"'{a}'" for a in args(mnt / "run", "train.steps=2")],
                    f"; rc=$?; ls -a {mnt}/run/checkpoints 2>/dev/null | grep -c tmp; exit $rc"])
    code, out, err = process(["unshare", "-rm", "sh", "-c", cmd])
    refused((code, out, err), message)
    assert out.strip().splitlines()[-1] == "0"  # no partial .tmp left on the full disk


# --- readers: load_model, convert, sample take the same verified path --------------------------------------
def test_convert_skips_a_poisoned_latest_and_says_so(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    poison(ckpt(run, 4), marker)
    convert = tool("convert_checkpoint")
    code, out, err = (lambda r: r)(__import__("tests.faults.helpers", fromlist=["call"]).call(
        convert.main, ["--to", "hf", "--input", str(run / "checkpoints"), "--output", str(tmp_path / "hf")], capsys))
    assert code == 0 and "skipping" in err and "step-00000002" in err, (out, err)
    assert not marker.exists()


def test_convert_refuses_a_poisoned_step_named_directly(run, tmp_path, capsys):
    from .helpers import call

    marker = tmp_path / "pwned"
    poison(ckpt(run, 4), marker)
    refused(call(tool("convert_checkpoint").main, ["--to", "hf", "--input", str(ckpt(run, 4)), "--output",
                                                   str(tmp_path / "hf")], capsys),
            r"step-00000004/\.metadata has \d+ bytes, its manifest says")
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("what", ["data_dir", "missing", "file", "empty_dir"])
def test_readers_refuse_what_is_not_a_checkpoint(prepared, tmp_path, capsys, what):
    from .helpers import call

    path = {"data_dir": prepared, "missing": tmp_path / "nope", "file": tmp_path / "f", "empty_dir": tmp_path / "e"}[what]
    if what == "file":
        path.write_text("x")
    if what == "empty_dir":
        path.mkdir()
    message = {"data_dir": r"is a prepared data set .*not a checkpoint", "missing": r"no such checkpoint directory",
               "file": r"is a file, not a checkpoint directory", "empty_dir": r"no complete checkpoint at"}[what]
    refused(call(tool("sample").main, ["--checkpoint", str(path)], capsys), message)
    refused(call(tool("convert_checkpoint").main, ["--to", "hf", "--input", str(path), "--output",
                                                   str(tmp_path / "hf")], capsys), message)


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "-5"], r"--tokens must be >= 1"),
    (["--top-k", "-1"], r"--top-k >= 0"),
    (["--temperature", "nan"], r"--temperature >= 0"),
])
def test_sample_argument_ranges(run, capsys, argv, message):
    from .helpers import call

    refused(call(tool("sample").main, ["--checkpoint", str(run / "checkpoints"), *argv], capsys), message)


# --- paths stay inside: a step is a directory its run wrote, under its own number ---------------------------
@pytest.mark.parametrize("kind, says", [
    ("symlink", "is a symbolic link (to"),
    ("copy", "says step 2, the directory is step-00000006: a step copied or renamed under another number"),
    ("absolute", "a path outside the step"),
    ("dotdot", "a path outside the step"),
    ("file_symlink", "is a symbolic link (to"),
])
def test_a_step_that_is_not_what_its_name_says_is_never_resumed(run, tmp_path, capsys, kind, says):
    """A linked or copied step under a newer number, or a manifest naming files outside the step, is skipped
    (said aloud, kept aside) for the newest real step; the run then goes on from there."""
    checkpoints = run / "checkpoints"
    fake = checkpoints / "step-00000006"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "payload").write_text("x")
    if kind == "symlink":
        fake.symlink_to(ckpt(run, 2))
    elif kind == "copy":
        shutil.copytree(ckpt(run, 2), fake)
    else:  # step 4's manifest (or one of its files) reaches outside
        fake = ckpt(run, 4)
        manifest = json.loads((fake / "manifest.json").read_text())
        if kind == "file_symlink":
            target = fake / "state.json"
            moved = outside / "state.json"
            shutil.move(target, moved)
            target.symlink_to(moved)
        else:
            name = str(outside / "payload") if kind == "absolute" else "../../../outside/payload"
            manifest["files"][name] = {"bytes": 1, "crc32": "00000000"}
            (fake / "manifest.json").write_text(json.dumps(manifest))
    out = resume(run, capsys, "train.steps=7")[1]
    assert f"checkpoint: skipping {fake}" in out and says in out, out
    newest = 2 if kind in ("absolute", "dotdot", "file_symlink") else 4
    assert f"resumed from {ckpt(run, newest)}" in out, out
    assert (outside / "payload").read_text() == "x"
    assert list(checkpoints.glob(f"{fake.name}.rejected-*")), "the rejected step is kept aside"


def test_an_hf_index_naming_a_file_outside_the_folder_is_refused(tmp_path, capsys):
    from .helpers import call

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
                                                "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
                                                "vocab_size": 64}))
    for name in ("../secret.safetensors", str(tmp_path / "secret.safetensors"), "sub/model.safetensors"):
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": name}}))
        refused(call(tool("convert_checkpoint").main, ["--to", "native", "--input", str(hf), "--output",
                                                       str(tmp_path / "native")], capsys),
                r"model.safetensors.index.json lists .*, not a file of .*: not read")
        assert not (tmp_path / "native").exists()


def test_a_pickle_in_an_rng_file_is_never_run_even_with_a_forged_manifest(run, tmp_path, capsys):
    """rng-rank0.pt is read with weights_only=True: a payload there, with the manifest forged to match, is one
    line naming the file — no code run, no advice to turn the check off."""
    import torch

    marker = tmp_path / "pwned"
    step = ckpt(run, 4)
    torch.save(Payload(marker), step / "rng-rank0.pt")
    _forge_manifest(step)
    message = refused(resume(run, capsys), r"rng-rank0.pt holds a pickle that refers to posix.system, not plain "
                                           r"data: not loaded")
    assert "weights_only" not in message
    assert not marker.exists()


def test_a_pickle_in_an_hf_bin_is_never_run(tmp_path, capsys):
    """pytorch_model.bin (read only with --allow-pickle) goes through weights_only=True: a payload is one line
    naming the file, nothing run, nothing written."""
    import torch

    from .helpers import call

    marker, hf = tmp_path / "pwned", tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
                                                "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
                                                "vocab_size": 64}))
    torch.save({"lm_head.weight": Payload(marker)}, hf / "pytorch_model.bin")
    message = refused(call(tool("convert_checkpoint").main, ["--to", "native", "--input", str(hf), "--output",
                                                             str(tmp_path / "native"), "--allow-pickle"], capsys),
                      r"pytorch_model.bin holds a pickle that refers to posix.system, not plain data: not loaded")
    assert "weights_only" not in message
    assert not marker.exists() and not (tmp_path / "native").exists()


@pytest.mark.parametrize("pointer", ["../../outside/step-00000006", "/etc", "symlink"])
def test_a_latest_pointing_outside_is_said_and_not_followed(run, tmp_path, capsys, pointer):
    """``latest`` naming a path outside the checkpoint dir (``..``, absolute) or being a symbolic link is said
    aloud and not followed: the run resumes from its newest verified step."""
    latest = run / "checkpoints" / "latest"
    outside = tmp_path / "outside" / "step-00000006"
    shutil.copytree(ckpt(run, 2), outside)
    latest.unlink()
    if pointer == "symlink":
        latest.symlink_to(outside / "state.json")
    else:
        latest.write_text(pointer)
    out = resumed_from(resume(run, capsys), 4)
    assert f"checkpoint: {latest} is " in out and "not the name of a step of" in out and "not followed" in out, out
