"""Writing files so that a kill at any instant leaves either the old file or the new one.

Every file the scan writes (censored copies, safe copies, in-place overwrites, quarantine
copies across file systems, the report's compaction, the HTML page, thumbnails) goes through
:func:`write_atomic`: a temporary file beside the target, fsync, then one rename (or one hard
link, where nothing may be overwritten); the temporary file is removed on any failure.

Temporary files are named ``.nsfw-safety-tmp-<pid>-<8 hex>``. The walk never scans them, and
:func:`remove_stale_temps` deletes those whose process is gone (a run killed mid-write).
"""

from __future__ import annotations

import errno
import filecmp
import itertools
import os
import re
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_PREFIX = ".nsfw-safety-tmp-"
_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-[0-9a-f]{8}")


def is_temp(name: str) -> bool:
    """Whether the file name ``name`` is one of our temporary files."""
    return _TEMP.fullmatch(name) is not None


def temp_beside(target: str | os.PathLike) -> Path:
    """A fresh temporary name in the folder of ``target`` (same file system: renames are atomic)."""
    return Path(target).parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this run has written nothing yet when it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, names: list[str] | None = None) -> list[str]:
    """Delete the temporary files in ``folder`` left by runs that are no longer alive.

    Args:
        folder: the folder to clean (not recursive).
        names: its entries when the caller has listed them already.
    Returns:
        The paths removed.
    """
    removed = []
    try:
        entries = os.listdir(folder) if names is None else names
    except OSError:
        return removed
    for name in entries:
        m = _TEMP.fullmatch(name)
        if m is not None and not _alive(int(m.group(1))):
            path = os.path.join(folder, name)
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def write_atomic(target: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool,
                 keep: os.stat_result | None = None, reuse_identical: bool = False, numbered: bool = True,
                 sync: bool = True) -> Path:
    """Write a file in one step: ``write(fh)`` fills a temporary file beside ``target``, which is
    synced and then renamed over ``target`` (``overwrite=True``) or published under the first
    free name of ``target``, ``name-1.ext``, ``name-2.ext``... (``overwrite=False``, a hard link:
    an existing file is never replaced, even by a concurrent writer).

    Args:
        target: where the file goes; its folder is created.
        write: fills the open binary file.
        overwrite: replace ``target`` when it exists.
        keep: the stat of a file being replaced: its mode and owner are given to the new one
            (``PermissionError`` when the owner cannot be kept).
        reuse_identical: with ``overwrite=False``, a taken name whose bytes equal the new file's
            is returned instead of adding a ``-N`` copy (so a re-run after a kill does not
            duplicate its outputs).
        numbered: with ``overwrite=False``, False raises ``FileExistsError`` when ``target`` is
            taken instead of trying ``-N`` names.
        sync: fsync before the rename (a kill never needs it; a power cut does). Thumbnails skip it.
    Returns:
        The path written.
    Raises:
        OSError: nothing was written; no temporary file is left behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            if keep is not None:
                _keep_metadata(fh.fileno(), keep)
            if sync:
                os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
            return target
        return publish(tmp, target, reuse_identical=reuse_identical, numbered=numbered)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _keep_metadata(fd: int, st: os.stat_result) -> None:
    """Give the file ``fd`` the owner and permission bits of ``st`` (owner first: a chown can
    clear the set-id bits)."""
    if (st.st_uid, st.st_gid) != os.fstat(fd)[4:6]:
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            raise PermissionError(errno.EPERM, f"cannot keep its owner (uid {st.st_uid}, gid {st.st_gid})") from None
    os.fchmod(fd, stat.S_IMODE(st.st_mode))


def publish(tmp: str | os.PathLike, target: str | os.PathLike, *, reuse_identical: bool = False,
            numbered: bool = True) -> Path:
    """Give the complete file ``tmp`` the first free name among ``target``, ``target-1``...
    (only ``target`` unless ``numbered``) without ever replacing an existing file; ``tmp``
    itself is left for the caller to remove."""
    target = Path(target)
    for n in itertools.count():
        candidate = target if n == 0 else target.with_name(f"{target.stem}-{n}{target.suffix}")
        try:
            link_no_clobber(tmp, candidate)
            return candidate
        except FileExistsError:
            if reuse_identical and os.path.isfile(candidate) and filecmp.cmp(tmp, candidate, shallow=False):
                return candidate
            if not numbered:
                raise
    raise AssertionError("unreachable")


def link_no_clobber(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` name the file ``src`` (a symlink itself, not its target); raise
    ``FileExistsError`` when ``dst`` exists. Both stay: the caller unlinks ``src`` when moving.
    Where hard links are not allowed, the same is done by a rename after an existence check.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.ENOENT):
            raise
        # no hard links on this file system (or fs.protected_hardlinks): rename instead
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        os.rename(src, dst)
