"""pretrain: distributed GPT and BERT pretraining.

``pretrain.kernels`` (the Triton kernels for the hot ops; ``pretrain.kernels.reference`` holds the plain-torch
definitions of correct) lives in the repository's top-level ``kernels/`` folder. An installed wheel maps it into
the package (``package-dir`` in pyproject.toml); in a checkout or an editable install it is bound here. The folder
has no ``__init__.py`` on purpose: with the checkout on ``sys.path`` it must not become the top-level ``kernels``,
the name of an unrelated distribution that transformers >= 5.25 imports (a regular package anywhere on the path
wins over a folder without ``__init__.py``).
"""

import sys as _sys
import types as _types
from pathlib import Path as _Path

__version__ = "0.1.0"


def _bind_kernels() -> None:
    inside = _Path(__file__).resolve().parent
    folder = inside.parent / "kernels"
    if "pretrain.kernels" in _sys.modules or (inside / "kernels").is_dir() or not (folder / "_common.py").is_file():
        return  # an installed wheel (pretrain/kernels/ is there), or nothing to bind
    module = _types.ModuleType("pretrain.kernels", "Triton kernels for the hot ops (the top-level kernels/ folder).")
    module.__path__ = [str(folder)]
    module.__package__ = "pretrain.kernels"
    _sys.modules["pretrain.kernels"] = module
    globals()["kernels"] = module


_bind_kernels()


# Log lines other libraries print on every import, known to be harmless here, dropped (one place, by message):
# torchao's optional CUDA extensions on a machine without them, and torch's notice about Enum constants torchao
# registers. Everything else those loggers say still prints.
_HARMLESS = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


def _quiet_harmless_logs() -> None:
    import logging

    for name, fragments in _HARMLESS.items():
        logging.getLogger(name).addFilter(
            lambda record, fragments=fragments: not any(f in str(record.msg) for f in fragments))


_quiet_harmless_logs()
