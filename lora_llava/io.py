"""Writes that are never seen half-done, and the one rule for refusing to replace what a user has.

Every output lora-llava makes (a run's final adapter, a checkpoint, a merged
release, a converted checkpoint, the run's recipe and metrics) is written
beside its target under a temporary name and renamed into place, so a kill,
a full disk or an error leaves the previous state whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def refuse_nonempty(path: Path, key: str, overwrite: bool) -> None:
    """A target that is a file, or a non-empty folder without `overwrite`, is refused naming `key`."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{key}: {path} exists and is not a folder")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise OutputError(f"{key}: {path} exists and is not empty (use --overwrite to replace it)")


def _chmod_like_mkdir(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; outputs get the permissions a plain mkdir would give."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def replace_dir(staged: Path, target: Path) -> None:
    """Rename the finished folder `staged` onto `target`; a folder already there is removed only after that."""
    if not target.exists():
        os.replace(staged, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(staged, target)
    except OSError:
        os.replace(old / target.name, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path, key: str, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `target` to write into; renamed onto `target` when the block succeeds.

    On any failure (an exception, KeyboardInterrupt) the temporary folder is removed and
    `target` is as it was. A non-empty `target` is refused without `overwrite`, checked
    again at the end in case it appeared meanwhile.
    """
    refuse_nonempty(target, key, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-", dir=target.parent))
    try:
        _chmod_like_mkdir(tmp)
        yield tmp
        refuse_nonempty(target, key, overwrite)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into(staged: Path, root: Path, last: str = "config.json") -> None:
    """Move each item of `staged` into `root` (replacing what has its name), names ending in `last` at the end.

    Weights first, configs last: a folder whose adapter_config.json is there has its weights.
    """
    for item in sorted(staged.iterdir(), key=lambda p: p.name.endswith(last)):
        target = root / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staged.rmdir()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
