"""A checkpoint step's manifest: every file's size and CRC-32, hashed by all ranks in parallel and written last
(``manifest.json``), and the verification that reads it before anything in the step is unpickled or read as
tensors. ``problems`` lists what is wrong with a step; ``verify`` raises on the first. (HF copies written while
training carry the same manifest: checkpoint/hf.py.)"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

from pretrain.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _checksums(directory: Path) -> dict[str, str]:
    """CRC-32 of every file below ``directory``, the files split over the ranks and the results gathered."""
    import torch.distributed as dist

    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {name: _crc32(directory / name) for name in names[rank::world]}
    if world == 1:
        return mine
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return {k: v for part in everyone for k, v in part.items()}


def write_manifest(directory: Path, step: int, checksums: dict[str, str] | None = None) -> None:
    """``directory/manifest.json``: the step and every file's size and CRC-32 (``checksums``, when the ranks
    hashed them already), written last, so a directory with a manifest is complete."""
    checksums = checksums if checksums is not None else {
        str(p.relative_to(directory)): _crc32(p) for p in sorted(Path(directory).rglob("*")) if p.is_file()}
    files = {name: {"bytes": (directory / name).stat().st_size, "crc32": crc} for name, crc in checksums.items()}
    (directory / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))


def read_manifest(path: Path) -> dict:
    """A step's manifest.json, checked for shape (plain JSON: nothing in it is executed)."""
    file = Path(path) / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint step (no manifest.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is unreadable ({type(exc).__name__}): the step is damaged") from None
    if isinstance(manifest, dict) and "splits" in manifest and "format" in manifest:
        raise CheckpointError(f"{path} is a prepared data set (tools/prepare_data.py), not a checkpoint")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise CheckpointError(f"{file} is not a checkpoint manifest (no step / files)")
    return manifest


def problems(path: Path, checksums: dict[str, str] | None = None) -> list[str]:
    """What is wrong with a step against its manifest (missing, resized or changed files, unlisted DCP metadata),
    before anything in it is unpickled or read as tensors. ``checksums`` (name -> CRC-32) saves re-hashing."""
    path = Path(path)
    if path.is_symlink():  # a step is a directory its run wrote: a link may name one step and hold another
        return [f"{path} is a symbolic link (to {os.readlink(path)}), not a step written here: not loaded"]
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    found = []
    listed = manifest["files"]
    for required in ("config.toml", "state.json"):
        if required not in listed:
            found.append(f"{path}: {required} is not in its manifest")
    if (path / ".metadata").exists() and ".metadata" not in listed:
        found.append(f"{path}: .metadata is not in its manifest (foreign file)")
    for name, info in listed.items():
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            found.append(f"{path}: its manifest lists {name!r}, a path outside the step: not loaded")
            continue
        file = path / name
        if file.is_symlink():
            found.append(f"{file} is a symbolic link (to {os.readlink(file)}): not loaded")
            continue
        if not file.is_file():
            found.append(f"{file} is missing")
            continue
        size = info["bytes"] if isinstance(info, dict) else info
        if file.stat().st_size != size:
            found.append(f"{file} has {file.stat().st_size} bytes, its manifest says {size} (truncated?)")
        elif isinstance(info, dict):
            crc = checksums[name] if checksums and name in checksums else _crc32(file)
            if crc != info.get("crc32"):
                found.append(f"{file} does not match its manifest's CRC-32 (corrupt or replaced)")
    if not found:
        found += _unparsable(path)
    return found


def _unparsable(path: Path) -> list[str]:
    """config.toml and state.json must parse (plain text formats: nothing is executed reading them)."""
    from pretrain.config import tomllib  # tomli on Python 3.10

    try:
        tomllib.loads((path / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [f"{path / 'config.toml'} does not parse ({type(exc).__name__})"]
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{path / 'state.json'} does not parse ({type(exc).__name__})"]
    named = STEP_DIR.match(path.name)
    if named and state["step"] != int(named.group(1)):
        return [f"{path / 'state.json'} says step {state['step']!r}, the directory is {path.name}: a step copied or "
                "renamed under another number; not loaded"]
    return []


def verify(path: Path, distributed_hash: bool = False) -> None:
    """Sizes and CRC-32s of a checkpoint's files against its manifest; CheckpointError names the first bad file.
    With ``distributed_hash`` every rank of the job hashes its share of the files (all ranks must call it)."""
    checksums = _checksums(Path(path)) if distributed_hash and Path(path).is_dir() else None
    found = problems(path, checksums)
    if found:
        raise CheckpointError(found[0])
