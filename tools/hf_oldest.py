#!/usr/bin/env python3
"""Run the Hugging Face conversion tests against the oldest transformers the ``hf`` extra allows.

    python tools/hf_oldest.py                      # the conversion, RoPE-scaling and refusal tests
    python tools/hf_oldest.py tests/checkpoint -x  # other pytest arguments

The version is read from pyproject.toml (``hf = ["transformers>=X"]``) and installed once, with the
huggingface_hub, tokenizers and kernels releases of its time, into ~/.cache/pretrain/transformers-X (pip
--target); pytest then runs with that folder first on PYTHONPATH, so the environment's own (newest) transformers
is untouched. Exit status: pytest's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ["tests/checkpoint/test_hf.py", "tests/models/test_rope.py", "tests/faults/test_hf_faults.py"]
# what each oldest version needs beside it (transformers 4.x wants huggingface_hub < 1.0, which needs requests —
# today's hub uses httpx, so an environment of today's transformers may lack it; transformers 4.x imports
# ``kernels`` when installed, and today's kernels needs huggingface_hub >= 1.0)
ERA = {"4.54.0": ["huggingface_hub>=0.34,<1.0", "tokenizers>=0.21,<0.22", "kernels==0.9.0", "requests>=2.32,<3",
                  "urllib3>=1.21,<3", "idna>=2.5,<4", "charset-normalizer>=2,<4", "certifi>=2017.4.17"]}


def oldest_allowed() -> str:
    """X.Y.0 of the ``hf`` extra's ``transformers>=X.Y``."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^hf = \["transformers>=([0-9.]+)"\]', text, re.M)
    if not match:
        raise SystemExit('error: pyproject.toml has no hf = ["transformers>=X"] extra')
    parts = (match[1].split(".") + ["0", "0"])[:3]
    return ".".join(parts)


def site(version: str) -> Path:
    """A folder holding transformers==version and its era's dependencies, installed once, then reused."""
    if version not in ERA:
        raise SystemExit(f"error: tools/hf_oldest.py does not know the dependencies of transformers {version}: "
                         "add them to ERA")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain" / f"transformers-{version}"
    wanted = "\n".join([f"transformers=={version}", *ERA[version]])
    marker = cache / ".requirements"
    if not (cache / "transformers" / "__init__.py").is_file() or not marker.is_file() or marker.read_text() != wanted:
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial),
                               *wanted.splitlines()], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise SystemExit(f"error: could not install transformers=={version}: {tail}")
        (partial / ".requirements").write_text(wanted)
        shutil.rmtree(cache, ignore_errors=True)
        partial.replace(cache)
    return cache


def main(argv: list[str]) -> int:
    version = oldest_allowed()
    folder = site(version)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}
    check = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"], env=env,
                           capture_output=True, text=True)
    if check.stdout.strip() != version:
        raise SystemExit(f"error: {folder} does not import as transformers {version}: {check.stderr.strip()[-300:]}")
    print(f"transformers {version} from {folder}", flush=True)
    args = [a for a in argv if not a.startswith("-")] and argv or [*DEFAULT_TESTS, *argv]
    # the tests that only train what a conversion wrote run no transformers code: the suite runs them once
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not hf_independent",
                           *args], cwd=ROOT,
                          env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
