"""Checkpoint save / load on ``torch.distributed.checkpoint`` (DCP), atomic and self-describing.

``CKPT_DIR/step-NNNNNNNN/`` holds the DCP shards of the model and optimizer, ``config.toml`` (the resolved
config), ``state.json`` (step, data-loader position, scheduler), ``rng-rankR.pt`` (tensors only, loaded with
``weights_only=True``) and ``manifest.json``, written last. A save goes to ``step-NNNNNNNN.tmp/`` and is renamed
once complete; ``CKPT_DIR/latest`` (replaced atomically) then names it. A directory without a manifest is never
loaded, and stale ``.tmp`` directories are removed when a manager starts.

A pipeline rank holding several stages passes them as an ``nn.ModuleList``: the list's index prefix is taken off
every key, so the checkpoint uses the whole model's names whatever the layout. The DeepSpeed engine writes its
own files (``deepspeed/``) inside the same atomic step directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from pretrain import distributed
from pretrain.checkpoint.manifest import (  # noqa: F401  (read_manifest, problems, STEP_DIR: re-exported)
    STEP_DIR,
    _checksums,
    _crc32,
    problems,
    read_manifest,
    verify,
    write_manifest,
)
from pretrain.errors import CheckpointError  # re-exported: raised here, defined with the other user errors
from pretrain.files import find_os_error


def _is_zero1(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _zero1_state(model: torch.nn.Module, optimizer) -> dict:
    """A ZeroRedundancyOptimizer's state as DCP sees an ordinary one: each rank contributes the per-parameter
    state of its own partition, keyed by parameter name, so a load on any number of ranks takes what it owns.
    (Hyper-parameters come from the config at every step and are not saved.)"""
    names = {id(p): n for n, p in model.named_parameters()}
    inner = optimizer.optim
    for group in inner.param_groups:  # make sure every owned parameter has state to load into
        for p in group["params"]:
            if not inner.state.get(p):
                inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return {"state": {names[id(p)]: st for p, st in inner.state.items()}}


OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)  # optimizer keys "state.<param name>.exp_avg"


def _model_and_optim_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict | None, dict[str, str]]:
    """DCP state dicts of model (+ optimizer, flattened) keyed by the whole model's parameter names; also the
    renaming applied (a ModuleList of pipeline stages loses its index prefix)."""
    if optimizer is not None and _is_zero1(optimizer):
        return get_model_state_dict(model), _zero1_state(model, optimizer), {}
    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    if not isinstance(model, torch.nn.ModuleList):
        return model_sd, optim_sd, {}
    names = {k: k.split(".", 1)[1] for k in model_sd}
    return {names[k]: v for k, v in model_sd.items()}, _rename_optim(optim_sd, names), names


def _rename_optim(optim_sd: dict | None, names: dict[str, str]) -> dict | None:
    """Rename the parameter part of flattened optimizer keys (``state.<name>.exp_avg``)."""
    if optim_sd is None:
        return None
    out = {}
    for key, value in optim_sd.items():
        kind, rest = key.split(".", 1)
        name, field = rest.rsplit(".", 1)
        out[f"{kind}.{names.get(name, name)}.{field}"] = value
    return out


def _restore_names(model_sd: dict, optim_sd: dict | None, names: dict[str, str]) -> tuple[dict, dict | None]:
    if not names:
        return model_sd, optim_sd
    back = {v: k for k, v in names.items()}
    return {back[k]: v for k, v in model_sd.items()}, _rename_optim(optim_sd, back)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: read it with only the classes DCP itself writes there, so a file crafted
    to run code on load (and even a manifest forged to match it) fails instead of executing."""

    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"), ("pathlib", "PosixPath"),
             ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
             ("collections", "OrderedDict")}

    def find_class(self, module, name):
        allowed = (module, name) in self.NAMES or module in self.MODULES and not name.startswith("__")
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise CheckpointError(f"refers to {module}.{name}, which DCP never writes there: not loaded")
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata goes through :class:`_MetadataUnpickler` (tensors are already read with
    ``weights_only=True`` by DCP)."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        if hasattr(self, "_get_metadata_path"):
            path = self._get_metadata_path(rank)
        else:  # older torch
            path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except CheckpointError as exc:
                raise CheckpointError(f"{path} {exc}") from None
        for info in (getattr(metadata, "storage_data", None) or {}).values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
                raise CheckpointError(f"{path} points a shard at {name!r}, outside its step: not loaded")
        if hasattr(metadata, "storage_meta") and hasattr(self, "load_id"):
            from torch.distributed.checkpoint.metadata import StorageMeta

            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _not_plain(exc: pickle.UnpicklingError) -> str:
    """The refusal of a pickle ``weights_only`` rejected: what it refers to (torch's own message goes on to suggest
    ``weights_only=False``: never repeated here)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"holds a pickle that {f'refers to {found[1]}' if found else 'is'}, not plain data: not loaded"


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP keeps every non-tensor entry (the optimizer's hyper-parameters, anything not a tensor) as a torch.save
    pickle inside the ``.distcp`` files and reads it back with ``torch.load(weights_only=False)``: a step whose
    files (and manifest) were rewritten would run code on resume. Each entry is read with ``weights_only=True``
    here (plain data: numbers, strings, tuples, dicts, tensors) and handed on as such."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"entry {read_item.dest_index.fqn} of {self.path} {_not_plain(exc)}") from None
        plain = io.BytesIO()
        torch.save(obj, plain)  # what the parent reads back: only the plain data just loaded
        plain.seek(0)
        super().load_bytes(read_item, plain)


def _unwrap(exc: BaseException, path: Path) -> CheckpointError:
    """The CheckpointError inside DCP's CheckpointException (per-rank (exception, traceback) pairs), or one line."""
    inners = [f[0] if isinstance(f, tuple) else f for f in getattr(exc, "failures", {}).values()]
    for inner in inners:
        if isinstance(inner, CheckpointError):
            return inner
    if inners:  # the first rank's own failure says more than DCP's wrapper
        exc = inners[0]
    first = str(exc).strip().splitlines()
    return CheckpointError(f"cannot load checkpoint {path}: {first[0] if first else type(exc).__name__}")


def _has_flat_optimizer(path: Path) -> bool:
    """Whether the checkpoint's optimizer entries use flattened names (``optim.param_groups.<param>.lr``)."""
    keys = SafeReader(str(path)).read_metadata().state_dict_metadata.keys()
    groups = [k for k in keys if k.startswith("optim.param_groups.")]
    return not groups or not groups[0].split(".")[2].isdigit()


def _write_failure(exc: BaseException, where: Path) -> str:
    """One line for a failed write: the OS error (no space, read-only, permission) when there is one."""
    e = find_os_error(exc)
    if e is not None:
        return f"cannot write checkpoint {where}: {e.strerror}" + (f" ({e.filename})" if e.filename else "")
    try:
        free = shutil.disk_usage(where.parent if where.parent.exists() else ".").free
    except OSError:
        free = None
    if free is not None and free < (64 << 20):
        return f"cannot write checkpoint {where}: no space left on the device ({free >> 20} MiB free)"
    return f"cannot write checkpoint {where}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3, rank: int = 0, keep_every: int = 0,
                 clean: bool = True):
        self.directory = Path(directory)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rank = rank
        self.pending = None  # (future, tmp dir, final dir, step) of a save still being written
        self._write_group = None  # asynchronous saves' own process group (see _background_group)
        if clean and rank == 0:
            self.remove_stale()

    def remove_stale(self) -> None:
        """Remove half-written saves (``step-*.tmp``) — only ever those. Call it from the run that owns the dir."""
        if self.directory.is_dir():
            for stale in self.directory.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    # --- finding ------------------------------------------------------------------------------------------
    def complete_steps(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        pointer = self.directory / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            candidate = self.directory / name
            # only a step name of this directory: "../elsewhere/step-…" or an absolute path is not followed
            if STEP_DIR.match(name) and is_complete(candidate) and not candidate.is_symlink():
                return candidate
        steps = self.complete_steps()  # pointer missing or stale: newest complete one
        return steps[-1] if steps else None

    def newest_verified(self, say=print, distributed_hash: bool = False) -> Path | None:
        """The newest step whose files match its manifest, checked before anything in it is unpickled or read as
        tensors. A step that fails is reported (``say``, one line naming the file) and the next older one tried;
        steps without a manifest are reported and left alone. None when there are no steps; CheckpointError when
        there are some and none verifies. With ``distributed_hash`` all ranks call this together and share the
        hashing (each rank reads its part of the files)."""
        if not self.directory.is_dir():
            return None
        pointer = self.directory / "latest"
        if pointer.is_symlink() or pointer.is_file():
            name = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
            if pointer.is_symlink() or not STEP_DIR.match(name) or (self.directory / name).is_symlink():
                shown = f"a symbolic link (to {os.readlink(pointer)})" if pointer.is_symlink() else repr(name[:200])
                say(f"checkpoint: {pointer} is {shown}, not the name of a step of {self.directory}: not followed")
        for path in sorted(self.directory.iterdir()):
            if STEP_DIR.match(path.name) and path.is_dir() and not is_complete(path):
                say(f"checkpoint: {path} has no manifest.json (an unfinished or foreign save): not loaded, left "
                    "in place")
        rejected = []
        for path in reversed(self.complete_steps()):
            found = problems(path, _checksums(path) if distributed_hash else None)
            if not found:
                if rejected:
                    say(f"checkpoint: using {path}, the newest step that verifies")
                    self._set_aside([step for step, _ in rejected], say, distributed_hash)
                return path
            say(f"checkpoint: skipping {path}: {found[0]}")
            rejected.append((path, found[0]))
        if rejected:
            raise CheckpointError(f"no checkpoint in {self.directory} verifies ({len(rejected)} tried; newest: "
                                  f"{rejected[0][1]})")
        return None

    def _set_aside(self, steps: list[Path], say, together: bool) -> None:
        """Rename steps that failed verification out of the way (``step-N.rejected-PID``), so that saving that
        step number again never deletes them: what was wrong with them stays there to look at. Rank 0 renames,
        once every rank is done reading them."""
        if together:
            distributed.barrier()
        if self.rank == 0:
            for step in steps:
                aside = step.with_name(f"{step.name}.rejected-{os.getpid()}")
                step.rename(aside)
                say(f"checkpoint: {step.name} failed verification; kept as {aside}")
        if together:
            distributed.barrier()

    def steps_on_disk(self) -> list[Path]:
        """Every step directory, complete or not (what a new run would write over)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if STEP_DIR.match(p.name))

    # --- saving -------------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
             config_toml: str, engine=None, async_save: bool = False) -> Path:
        """Write step ``step``. With ``async_save`` the shards are staged to CPU memory here and written by a
        background thread; ``poll()`` / ``wait()`` complete the save (manifest, rename, ``latest``) once every rank
        has finished. At most one save is in flight: a new one first waits for the previous."""
        self.wait()
        final = self.directory / step_dir_name(step)
        tmp = self.directory / (step_dir_name(step) + ".tmp")
        with self._cleaned_on_failure(tmp):
            return self._save(step, model, optimizer, state, config_toml, engine, async_save, final, tmp)

    @contextlib.contextmanager
    def _cleaned_on_failure(self, tmp: Path):
        """A failed save leaves nothing behind (a partial .tmp on a full disk would only make it fuller) and ends
        in one CheckpointError line naming the reason."""
        try:
            yield
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            self.pending = None
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_write_failure(exc, tmp)) from exc

    def _save(self, step, model, optimizer, state, config_toml, engine, async_save, final: Path, tmp: Path) -> Path:
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        distributed.barrier()
        future = None
        if engine is not None:
            engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
        else:
            model_sd, optim_sd, _ = _model_and_optim_state(model, optimizer)
            payload = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # single-process DCP warns that no process group exists
                if async_save:
                    future = dcp.async_save(payload, checkpoint_id=str(tmp), process_group=self._background_group())
                else:
                    dcp.save(payload, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            (tmp / "config.toml").write_text(config_toml)
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        self.pending = (future, tmp, final, step)
        if future is None:
            self._finish()
        return final

    def _background_group(self):
        """The process group of an asynchronous save's background writes: their collectives (gathering what each
        rank wrote, before the metadata) must not share the default group with the training's, which run at the
        same time — interleaved on one gloo group they mismatch (aborts) or wait on each other for good. One gloo
        group, made by every rank at its first asynchronous save (all ranks save the same steps)."""
        if not torch.distributed.is_initialized():
            return None
        if self._write_group is None:
            self._write_group = torch.distributed.new_group(backend="gloo")
        return self._write_group

    def poll(self) -> bool:
        """Complete an asynchronous save if every rank's write is done (call from all ranks, e.g. each step);
        returns whether one is still in flight."""
        if self.pending is None:
            return False
        done = torch.tensor(float(self.pending[0].done()))
        distributed.all_reduce_min(done)
        if done.item() == 1.0:
            self._finish()
        return self.pending is not None

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete."""
        if getattr(self, "pending", None) is not None:
            self._finish()

    def _finish(self) -> None:
        with self._cleaned_on_failure(self.pending[1]):
            self._complete()

    def _complete(self) -> None:
        future, tmp, final, step = self.pending
        self.pending = None
        if future is not None:
            future.result()  # re-raises a failed write
        distributed.barrier()
        checksums = _checksums(tmp)  # every rank hashes its share of the files
        if self.rank == 0:
            write_manifest(tmp, step, checksums)
            if final.exists() and not is_complete(final):  # not ours to delete: set aside, said aloud
                aside = final.with_name(f"{final.name}.no-manifest-{os.getpid()}")
                final.rename(aside)
                print(f"checkpoint: {final} had no manifest.json (an unfinished or foreign save); kept as {aside}",
                      flush=True)
            elif final.exists():  # a re-save of the same step replaces the old one only once complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.directory / "latest", final.name)
            self._prune(keep=final)
        distributed.barrier()

    def _prune(self, keep: Path) -> None:
        """Drop complete steps beyond the newest ``keep_last``; never ``keep`` (the step just written, which
        ``latest`` names) nor a permanent one."""
        if self.keep_last <= 0:
            return
        others = [p for p in self.complete_steps() if p != keep]
        survivors = others[len(others) - (self.keep_last - 1):] if self.keep_last > 1 else []
        for old in others:
            if old in survivors or self.keep_every and int(STEP_DIR.match(old.name).group(1)) % self.keep_every == 0:
                continue  # among the newest, or a permanent one
            shutil.rmtree(old, ignore_errors=True)

    # --- loading ------------------------------------------------------------------------------------------
    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             engine=None, local: bool = False) -> dict[str, Any]:
        """Restore model (+ optimizer, RNG) from ``path``; returns state.json (step, data, scheduler). ``local``:
        this process alone reads the whole model (``load_model``), even inside a distributed job."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete (no manifest.json); refusing to load it")
        state = json.loads((path / "state.json").read_text())
        if state.get("model_only"):  # an imported model: weights, no optimizer or data position
            optimizer = None
        restore = _layout(path, optimizer, engine)
        restore(path, model, optimizer, engine, local)
        rng_file = path / f"rng-rank{self.rank}.pt"
        if rng_file.is_file() and not state.get("model_only"):
            try:
                rng = torch.load(rng_file, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{rng_file} {_not_plain(exc)}") from None
            set_rng_state(rng)
        return state


# --- one restore per state layout -----------------------------------------------------------------------------
def _layout(path: Path, optimizer, engine):
    """The restore for the layout ``path`` holds, as this run reads it; a DeepSpeed step and a native run (or the
    reverse) are refused in one line."""
    written_by_deepspeed = (path / "deepspeed").is_dir()
    if engine is not None and not written_by_deepspeed:
        raise CheckpointError(f'{path} was not written by the DeepSpeed engine; resume it with parallel.engine = '
                              '"native"')
    if engine is None and written_by_deepspeed:
        raise CheckpointError(f'{path} was written by the DeepSpeed engine; resume it with parallel.engine = '
                              '"deepspeed"')
    if engine is not None:
        return _restore_deepspeed
    if optimizer is None:
        return _restore_model
    if _is_zero1(optimizer):
        return _restore_zero1
    return _restore_flat if _has_flat_optimizer(path) else _restore_nested


def _dcp_load(path: Path, to_load: dict, local: bool) -> dict:
    """Read ``to_load``'s entries from the DCP files of ``path`` in place (only the allowlisted metadata)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-process DCP warns that no process group exists
        try:
            dcp.load(to_load, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(path), no_dist=local)
        except CheckpointException as exc:  # DCP wraps every rank's failure: surface ours
            raise _unwrap(exc, path) from None
    return to_load


def _restore_deepspeed(path: Path, model, optimizer, engine, local: bool) -> None:
    """DeepSpeed reads its files with ``torch.load(weights_only=False)``: each is read here first with
    ``weights_only=True`` (memory-mapped: the tensors stay on disk; DeepSpeed's plain classes allowlisted), and
    one that refers to anything else is refused before DeepSpeed unpickles it."""
    from pretrain.checkpoint import _load_deepspeed_file

    for file in sorted((path / "deepspeed").rglob("*.pt")):
        try:
            _load_deepspeed_file(file, mmap=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{file} {_not_plain(exc)}") from None
    engine.load_checkpoint(str(path / "deepspeed"), tag="state")


def _restore_model(path: Path, model, optimizer, engine, local: bool) -> None:
    """Weights only (an imported model, ``load_model``, or a run without optimizer)."""
    model_sd, _, names = _model_and_optim_state(model, None)
    loaded = _dcp_load(path, {"model": model_sd}, local)
    set_model_state_dict(model, _restore_names(loaded["model"], None, names)[0])


def _restore_zero1(path: Path, model, optimizer, engine, local: bool) -> None:
    """ZeRO-1: the optimizer's state dict is its own shards' tensors, which DCP fills in place."""
    model_sd, optim_sd, _ = _model_and_optim_state(model, optimizer)
    _dcp_load(path, {"model": model_sd, "optim": optim_sd}, local)
    set_model_state_dict(model, model_sd)


def _restore_flat(path: Path, model, optimizer, engine, local: bool) -> None:
    """The layout every native save writes: flattened optimizer keys under the whole model's parameter names."""
    model_sd, optim_sd, names = _model_and_optim_state(model, optimizer)
    loaded = _dcp_load(path, {"model": model_sd, "optim": optim_sd}, local)
    model_sd, optim_sd = _restore_names(loaded["model"], loaded["optim"], names)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIONS)


def _restore_nested(path: Path, model, optimizer, engine, local: bool) -> None:
    """Written before optimizer state was flattened: read in the nested layout."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = _dcp_load(path, {"model": model_sd, "optim": optim_sd}, local)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=StateDictOptions())


def saved_config_toml(path: Path) -> str:
    return (Path(path) / "config.toml").read_text()
