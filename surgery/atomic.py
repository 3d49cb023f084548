"""Atomic outputs: build in a temporary folder beside the destination, move into place at the end.

A failed or interrupted run leaves no half-written output and never touches the inputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from surgery.errors import SurgeryError

__all__ = ["atomic_dir", "atomic_files", "check_destination", "check_folder_creatable"]


def check_destination(dest: str | os.PathLike[str], *, force: bool) -> Path:
    """Return ``dest`` as a path, refusing an existing one unless ``force``."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise SurgeryError(f"{dest}: output already exists; pass --force to replace it")
    if not dest.parent.exists():
        raise SurgeryError(f"{dest.parent}: output folder's parent does not exist; create it first")
    return dest


def _make_temp_dir(dest: Path) -> Path:
    """An empty folder beside ``dest``, with the permissions a new folder would get."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``dest`` when the block succeeds.

    On any exception (Ctrl-C included) the temporary folder is removed and ``dest`` is untouched.
    """
    dest = check_destination(dest, force=force).absolute()
    tmp = _make_temp_dir(dest)
    try:
        yield tmp
        if dest.exists() or dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            _remove(old)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(dest: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; every file written there is moved beside ``dest`` on success.

    For single-file outputs with companions (``model.onnx`` + ``model.onnx.data``): write
    ``tmp / dest.name`` and its companions into the yielded folder. Existing companions are
    replaced only under ``force``.
    """
    dest = check_destination(dest, force=force).absolute()
    tmp = _make_temp_dir(dest)
    try:
        yield tmp
        written = sorted(tmp.iterdir())
        clashes = [dest.parent / p.name for p in written if (dest.parent / p.name).exists()]
        if clashes and not force:
            raise SurgeryError(f"{clashes[0]}: already exists; pass --force to replace it")
        # Companions (data files) first, the model file last: a reader never sees a model
        # whose data is missing.
        for path in sorted(written, key=lambda p: p.name == dest.name):
            os.replace(path, dest.parent / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_folder_creatable(path: str | os.PathLike[str], *, what: str) -> Path:
    """Return ``path``, refusing one that is a file or that cannot be created (checked, not made).

    Args:
        path: A folder that may exist, or be created later with its missing parents.
        what: How the message names it, e.g. ``--dump-dir``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SurgeryError(f"{path}: {what} is a file, not a folder; give a folder")
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SurgeryError(f"{path}: cannot create {what}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SurgeryError(f"{path}: cannot write {what}: {ancestor} is not writable")
    return path
