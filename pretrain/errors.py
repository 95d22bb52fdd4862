"""The errors a user can fix. Each carries one line naming the cause; every entry point catches ``UserError``
alone, prints ``error: <line>`` and exits 2 (on every rank layout: rank 0 says it, the others wait and exit).

The concrete classes keep the built-in base each had (``ValueError`` for bad values, ``RuntimeError`` for states
of the world), so code that caught those still does. The modules that raise them re-export them under their old
names (``pretrain.config.ConfigError``, ``pretrain.checkpoint.manager.CheckpointError``, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the cause."""


class ConfigError(UserError, ValueError):
    """A config problem; the message names the key."""


class DataError(UserError, ValueError):
    """Unreadable, inconsistent or missing data (corpus, prepared set, loader state)."""


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be read or used."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or model directory that cannot be used as asked."""


class LockError(UserError, RuntimeError):
    """Another live process holds a directory this run needs for itself, or the directory is unusable."""


class MissingExtra(UserError, RuntimeError):
    """An optional dependency is not installed; the message names the extra (``pip install -e '.[extra]'``)."""


def missing_extra(what: str, extra: str, detail: str = "") -> MissingExtra:
    """``what needs <extra> (detail): pip install -e '.[extra]'`` as an exception to raise."""
    return MissingExtra(f"{what} needs {extra}{f' ({detail})' if detail else ''}: pip install -e '.[{extra}]'")
