"""The fault battery's tools: call a command's ``main`` in this process (or a real process where a signal, a limit
or a mount is the fault), check that it ended with one clear line and the right exit status, and that nothing that
existed before changed."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
from pathlib import Path

from ..conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]

TINY = [*TINY_MODEL, "train.micro_batch_size=4", "schedule.warmup_steps=1", "logging.interval=1", "logging.tensorboard=false",
        "logging.heartbeat_s=0", "data.source=synthetic"]


def tool(name: str):
    """tools/NAME.py as a module (its ``main(argv)``)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(main, argv, capsys) -> tuple[int, str, str]:
    """Run ``main(argv)`` here; an exception escaping it is a traceback the user would have seen: fail."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train(argv, capsys) -> tuple[int, str, str]:
    from pretrain.train import main

    return call(main, argv, capsys)


def process(argv, *, timeout=300, env=None, **kwargs) -> tuple[int, str, str]:
    """A real process (signals, resource limits, mounts): no in-process shortcut can show those."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env, **kwargs)
    return proc.returncode, proc.stdout, proc.stderr


def refused(result, pattern: str, code: int = 2) -> str:
    """Exit ``code``, exactly one ``error:`` line on stderr matching ``pattern``, no traceback anywhere."""
    rc, out, err = result
    assert "Traceback" not in out + err, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == code, (rc, out[-2000:], err[-2000:])
    assert len(errors) == 1, err[-2000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def digest(root: Path) -> dict[str, str]:
    """Every file and directory below ``root`` (or ``root`` itself, a file) with a hash of its bytes."""
    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out
