"""What the scan does to files: censored copies, safe copies, in-place overwrites, quarantine.

Nothing a user gave us is lost or overwritten, even under ``kill -9``:

* copies are written with :func:`~.files.write_atomic` and never replace an existing file (a
  taken name gets ``-1``, ``-2``...; an identical file left by a killed run is reused);
* ``--in-place`` replaces the original in one rename, keeping its mode and owner (its mtime
  becomes the time of the change); a symbolic link, or a read-only file without ``--force``,
  is refused;
* a move to the quarantine is recorded in the report *before* it happens (the row names the
  target), and is done as a hard link followed by an unlink of the original (a copy, then an
  unlink, across file systems). :func:`recover_move` finishes or voids such a move after a kill.
"""

from __future__ import annotations

import errno
import filecmp
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .files import link_no_clobber, write_atomic


class OutputError(OSError):
    """An output was refused or could not be written; the message is the row's reason."""


def save_format(path: str | os.PathLike) -> str | None:
    """The PIL format that writes files named like ``path``, or None."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    return fmt if fmt in Image.SAVE else None


def censored_name(rel: Path) -> Path:
    """The name of a censored copy: the original's, or ``.png`` added when PIL cannot write it."""
    return rel if save_format(rel) else rel.with_name(rel.name + ".png")


def _encoder(image: Image.Image, original: Image.Image, target: Path):
    """A writer of ``image`` in the format that ``target``'s extension names, keeping the
    original's PNG text chunks (e.g. generation parameters) and ICC profile. EXIF is not
    copied: its embedded thumbnail would show the uncensored image."""
    fmt = save_format(target) or "PNG"
    kwargs: dict[str, Any] = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in original.info.items():
            if isinstance(value, PngImagePlugin.iTXt):
                info.add_itxt(key, value, value.lang, value.tkey)
            elif isinstance(value, str):
                info.add_text(key, value)
        kwargs["pnginfo"] = info
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = 95
        if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
    if "icc_profile" in original.info and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        kwargs["icc_profile"] = original.info["icc_profile"]
    return lambda fh: image.save(fh, format=fmt, **kwargs)


def write_censored(image: Image.Image, original: Image.Image, target: Path) -> Path:
    """Write the censored copy ``image`` at ``target`` (or a free ``-N`` name); returns the path."""
    return write_atomic(target, _encoder(image, original, target), overwrite=False, reuse_identical=True)


def _copier(src: str):
    """A writer of the bytes, permission bits and times of the file ``src``."""
    def write(fh) -> None:
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, fh, 1 << 20)
        fh.flush()
        shutil.copystat(src, fh.name)
    return write


def copy_file(src: str, target: Path) -> Path:
    """Copy ``src`` byte for byte (and its times) to ``target`` or a free ``-N`` name."""
    return write_atomic(target, _copier(src), overwrite=False, reuse_identical=True)


def overwrite(path: str, image: Image.Image, original: Image.Image, force: bool) -> os.stat_result:
    """Replace the file ``path`` by ``image`` in one rename, keeping its mode and owner.

    Raises:
        OutputError: ``path`` is a symbolic link, or read-only and ``force`` is False, or its
            owner cannot be kept; the file is then untouched.
    Returns:
        The stat of the new file.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(errno.EPERM, "is a symbolic link: not overwritten (scan its target instead)")
    if not force and (not stat.S_IMODE(st.st_mode) & 0o222 or not os.access(path, os.W_OK)):
        raise OutputError(errno.EACCES, "is read-only: not overwritten (--force overwrites it)")
    try:
        write_atomic(path, _encoder(image, original, Path(path)), overwrite=True, keep=st)
    except PermissionError as e:
        raise OutputError(errno.EPERM, f"not overwritten: {e.strerror or e}") from None
    return os.stat(path)


def free_name(target: Path, claimed: set[str]) -> Path:
    """The first of ``target``, ``name-1.ext``... that neither exists nor is ``claimed``."""
    n = 0
    while True:
        candidate = target if n == 0 else target.with_name(f"{target.stem}-{n}{target.suffix}")
        if str(candidate) not in claimed and not os.path.lexists(candidate):
            return candidate
        n += 1


def move(src: str, target: Path) -> None:
    """Move ``src`` to ``target``, which must not exist (``FileExistsError``): a hard link and
    an unlink, or across file systems a synced copy published under ``target``, then an unlink.
    At every instant the file exists under ``src``, ``target`` or both."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        link_no_clobber(src, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        if os.path.islink(src):
            raise OSError(errno.EXDEV, "a link is not moved to another file system") from None
        write_atomic(target, _copier(src), overwrite=False, numbered=False)
    try:
        os.unlink(src)
    except FileNotFoundError:  # renamed (no hard links on this file system)
        pass


def recover_move(row: dict[str, Any]) -> bool:
    """After a kill: settle a move that ``row`` announced (``row["moved_to"]``).

    Returns:
        True when the row holds: the original is in the quarantine (the move is finished here
        when both names hold the same file, or identical bytes after a copy across file
        systems). False when the move did not happen: the original is still in place and must
        be scanned again.
    """
    src, target = row["path"], row["moved_to"]
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return True  # moved (or removed by someone else: nothing left to do)
    try:
        tst = os.lstat(target)
    except FileNotFoundError:
        return False
    if not (os.path.samestat(st, tst) or (stat.S_ISREG(st.st_mode) and stat.S_ISREG(tst.st_mode)
                                          and filecmp.cmp(src, target, shallow=False))):
        return False
    os.unlink(src)
    return True
