"""Atomic outputs: build in a temporary folder beside the destination, move into place at the end.

What a caller gets (the README's "Reliability" section says the same to users):

* **Inputs are never outputs.** :func:`check_destination` refuses a destination that equals,
  contains or sits inside any path the run reads (symlinks resolved), or that contains the
  working folder, before anything is written; ``force`` does not lift this.
* **No silent replacement.** Without ``force`` the final move fails if the destination appeared
  while the run was writing (another run into the same ``-o``). Linux's ``rename(2)`` would
  silently replace an empty folder or any file, so the move is ``renameat2(RENAME_NOREPLACE)``:
  one system call that fails with ``EEXIST`` if anything is there. Where the kernel or the file
  system lacks it, a folder is claimed with ``mkdir`` (which fails if the name exists) and the
  temporary folder is renamed onto that empty folder (which fails if someone wrote into it); a
  file is ``link``-ed to its final name (fails if taken) and its temporary name unlinked.
* **No window without an output.** With ``force`` the new output and the old one are swapped by
  ``renameat2(RENAME_EXCHANGE)``: at every instant the destination is the complete old or the
  complete new output. The old one then sits under the temporary name and is removed with it.
  Without that call, the old output is first renamed to ``.NAME.old-PID-XXXX`` and the next run
  restores it (destination missing) or removes it (destination complete).
* **Durable.** Before the final move every file and folder of the new output is ``fsync``-ed,
  after it the parent folder: after a power loss the destination is the old or the new output.
* **Nothing left behind.** A failed or interrupted run (Ctrl-C; SIGTERM, which the CLI turns into
  the same exception) removes its temporary folder. SIGKILL cannot be caught, so temporary entries
  are named ``.NAME.tmp-PID-XXXX`` and the run holds an ``flock`` on its temporary folder for its
  whole life. The kernel drops that lock when the process dies, however it dies. A later run into
  the same destination removes entries whose lock is free *and* whose PID is not alive: the lock
  alone would race with a run that has created its folder but not locked it yet, the PID alone
  could be reused by an unrelated process (then the entry is kept, never wrongly removed).
* **Environment errors are user errors.** Disk full, read-only file system and permission denied
  become a :class:`SurgeryError` naming the destination (:func:`environment_error`).

The standard library has no atomic no-replace rename (``os.rename`` replaces, ``os.replace``
too, ``shutil.move`` copies), hence ``renameat2`` through ``ctypes``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from surgery.errors import SurgeryError

__all__ = [
    "atomic_dir",
    "atomic_files",
    "check_destination",
    "check_folder_creatable",
    "environment_error",
]

logger = logging.getLogger(__name__)

#: Signals that end a run with cleanup (Ctrl-C, and SIGTERM which the CLI turns into the same).
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, or another C library
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2_func = _load_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the kernel or file system lacks it."""
    if _renameat2_func is None:
        return False
    if _renameat2_func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists, even as an empty folder."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # claims the name; rename(2) onto our own empty folder then replaces it
        try:
            os.rename(src, dst)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.rmdir(dst)  # our claim, unless someone wrote into it meanwhile
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(exc.errno, "appeared meanwhile", str(dst)) from None
            raise
    else:
        os.link(src, dst, follow_symlinks=False)
        os.unlink(src)


def _swap(src: Path, dst: Path, old: Path) -> None:
    """Put ``src`` at ``dst``; what was at ``dst`` ends at ``src`` (exchange) or ``old``."""
    if _renameat2(src, dst, _RENAME_EXCHANGE):
        return
    # No exchange: two renames, and a window in which ``dst`` is missing. A crash there leaves
    # the previous output as ``old``, which the next run's :func:`_clean_stale` puts back.
    os.rename(dst, old)
    os.rename(src, dst)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (``root`` included), deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                _fsync(path)
        _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)


# -- temporary entries and their owners ----------------------------------------------------------

_ENTRY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<token>[A-Za-z0-9_]+)$")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a PID this module wrote; keep the entry
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _clean_stale(dest: Path) -> None:
    """Remove temporary entries of dead runs beside ``dest``; put back an orphaned old output."""
    try:
        names = sorted(p for p in os.listdir(dest.parent) if p.startswith(f".{dest.name}"))
    except OSError:
        return
    entries = [(name, m) for name in names if (m := _ENTRY.match(name))]
    live_tokens = set()
    for name, match in entries:
        if match["kind"] != "tmp":
            continue
        if _alive(int(match["pid"])):
            live_tokens.add(match["token"])
            continue
        fd = _try_lock(dest.parent / name)
        if fd is None:  # locked: alive in another PID namespace
            live_tokens.add(match["token"])
            continue
        try:
            logger.info("removing %s, left by an interrupted run", dest.parent / name)
            shutil.rmtree(dest.parent / name, ignore_errors=True)
        finally:
            os.close(fd)
    for name, match in entries:
        if match["kind"] != "old" or match["token"] in live_tokens or _alive(int(match["pid"])):
            continue
        old, target = dest.parent / name, dest.parent / match["name"]
        try:
            if os.path.lexists(target):
                logger.info("removing %s, replaced by a run that was interrupted", old)
                _remove(old)
            else:
                logger.warning("restoring %s from %s (a run was interrupted)", target, old)
                _rename_noreplace(old, target)
        except OSError as exc:
            logger.warning("could not clean up %s: %s", old, exc)


@contextlib.contextmanager
def _locked_temp_dir(dest: Path) -> Iterator[Path]:
    """An empty, locked folder beside ``dest`` (permissions of a new folder), removed at exit.

    Ctrl-C and SIGTERM are held back until the folder is made and the ``try`` that removes it is
    entered, so none can land between its ``mkdir`` and that ``try`` (seen on a loaded machine: a
    leftover folder after Ctrl-C).
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    blocked, tmp = True, None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending signal is raised here
        blocked = False
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)
            yield tmp
        finally:
            os.close(fd)
    finally:
        if blocked:  # mkdtemp failed
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if tmp is not None and os.path.lexists(tmp):
            _remove(tmp)


def _old_name(item: Path, tmp: Path) -> Path:
    """Where :func:`_swap` parks ``item``'s previous version: named after the run's temp folder."""
    run = tmp.name.rsplit(".tmp-", 1)[1]
    return item.parent / f".{item.name}.old-{run}"


def _publish(src: Path, dst: Path, tmp: Path, *, force: bool) -> None:
    """Move ``src`` to ``dst``: never over something unless ``force``, then atomically."""
    try:
        if force and os.path.lexists(dst):
            _swap(src, dst, _old_name(dst, tmp))
        else:
            _rename_noreplace(src, dst)
    except FileExistsError:
        if not force:
            raise SurgeryError(
                f"{dst}: appeared while this run was writing (another run?); it was kept; "
                "pass --force to replace it"
            ) from None
        _swap(src, dst, _old_name(dst, tmp))


# -- environment errors --------------------------------------------------------------------------

_ENVIRONMENT = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write elsewhere"),
    errno.EACCES: ("permission denied", "check its permissions or use another location"),
    errno.EPERM: ("operation not permitted", "check its permissions or use another location"),
}


def environment_error(exc: OSError, output: Path | None = None) -> SurgeryError | None:
    """A one-line user error for disk full, read-only or permission denied; None for others.

    With ``output``, the message names that output (the OS names a temporary file, or nothing).
    """
    if exc.errno not in _ENVIRONMENT:
        return None
    reason, fix = _ENVIRONMENT[exc.errno]
    if output is not None:
        return SurgeryError(f"{output}: cannot write the output: {reason}; {fix}")
    where = exc.filename if exc.filename is not None else "surgery"
    return SurgeryError(f"{where}: {reason}; {fix}")


def _about_output(exc: OSError, dest: Path) -> bool:
    """Whether ``exc`` is about writing beside ``dest`` (not about reading an input)."""
    if exc.filename is None:
        return True  # write(2) errors name no file: ENOSPC while writing a tensor
    return Path(os.path.abspath(os.fsdecode(exc.filename))).is_relative_to(dest.parent)


@contextlib.contextmanager
def _environment_errors(dest: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        error = environment_error(exc, dest) if _about_output(exc, dest) else None
        if error is None:
            raise
        raise error from None


# -- the public API ------------------------------------------------------------------------------


def _overlap(dest: Path, inputs: Iterable[str | os.PathLike[str]]) -> SurgeryError | None:
    target = Path(os.path.realpath(dest))
    for path in inputs:
        real = Path(os.path.realpath(path))
        if target == real:
            how = "is"
        elif real.is_relative_to(target):
            how = "holds"
        elif target.is_relative_to(real):
            how = "is inside"
        else:
            continue
        return SurgeryError(
            f"{dest}: the output {how} {path}, which this run reads; choose another output "
            "location (--force never replaces an input)"
        )
    if Path.cwd().resolve().is_relative_to(target):
        return SurgeryError(
            f"{dest}: the output holds the current folder; choose another output location"
        )
    return None


def check_destination(
    dest: str | os.PathLike[str],
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Return ``dest`` as a path, or refuse it; clean up after interrupted runs into it.

    Refused: a destination that equals, contains or sits inside one of ``inputs`` (files and
    folders the run reads) or contains the working folder, even with ``force``; a missing or
    non-folder parent; an existing destination without ``force``.
    """
    dest = Path(dest)
    error = _overlap(dest, inputs)
    if error is not None:
        raise error
    parent = Path(os.path.abspath(dest)).parent
    if not parent.is_dir():
        shown = dest.parent if str(dest.parent) != "." else parent
        if parent.exists():
            raise SurgeryError(f"{dest}: {shown} is not a folder; choose another output location")
        raise SurgeryError(f"{dest}: the output's folder {shown} does not exist; create it first")
    _clean_stale(Path(os.path.abspath(dest)))
    if os.path.lexists(dest) and not force:
        raise SurgeryError(f"{dest}: output already exists; pass --force to replace it")
    return dest


@contextlib.contextmanager
def atomic_dir(
    dest: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``dest`` when the block succeeds.

    On any exception (Ctrl-C and SIGTERM included) the temporary folder is removed and ``dest``
    is untouched. ``inputs``: paths the run reads, which ``dest`` must stay clear of.
    """
    shown = check_destination(dest, force=force, inputs=inputs)
    dest = Path(os.path.abspath(shown))
    with _environment_errors(shown), _locked_temp_dir(dest) as tmp:
        yield tmp
        _sync_tree(tmp)
        _publish(tmp, dest, tmp, force=force)
        _fsync(str(dest.parent), os.O_RDONLY | os.O_DIRECTORY)


@contextlib.contextmanager
def atomic_files(
    dest: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Iterator[Path]:
    """Yield a temporary folder; every file written there is moved beside ``dest`` on success.

    For single-file outputs with companions (``model.onnx`` + ``model.onnx.data``): write
    ``tmp / dest.name`` and its companions into the yielded folder. Companions go first and the
    model file last, each with the no-replace or exchange move of :func:`atomic_dir`; existing
    files are replaced only under ``force``. If one is refused, those already moved are removed.
    With ``force``, a crash between two moves (microseconds) can leave the new data file beside
    the old model file.
    """
    shown = check_destination(dest, force=force, inputs=inputs)
    dest = Path(os.path.abspath(shown))
    with _environment_errors(shown), _locked_temp_dir(dest) as tmp:
        yield tmp
        _sync_tree(tmp)
        written = sorted(tmp.iterdir(), key=lambda p: (p.name == dest.name, p.name))
        moved: list[tuple[Path, os.stat_result]] = []
        try:
            for path in written:
                target = dest.parent / path.name
                stat = path.stat()
                _publish(path, target, tmp, force=force)
                moved.append((target, stat))
        except BaseException:
            for target, stat in moved:
                now = target.stat()
                if (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino) and not force:
                    target.unlink()  # ours, and it did not replace anything
            raise
        _fsync(str(dest.parent), os.O_RDONLY | os.O_DIRECTORY)


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
