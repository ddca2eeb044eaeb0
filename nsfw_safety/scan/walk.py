"""Finding the files to scan: folders recursively, links, exclusions, temporary files.

Rules (so that a clean exit means every image under the roots was checked):

* Folders are walked recursively; files with an image extension are picked. A file named on
  the command line is scanned whatever its extension.
* A real file is scanned once, however many roots or links lead to it.
* A link to a folder inside the roots is not walked again: the folder's files are scanned
  under their real path. A link to a folder outside the roots is not followed (a scan must not
  wander off, nor write outside what it was given); it becomes an error row that says so.
* A link to a file that the walk reaches on its own is skipped for the same reason; a link to
  any other file (outside the roots) is scanned through the link, read-only.
* A folder that cannot be listed is an error row, as is a broken link.
* Output folders (``exclude``) inside the roots are skipped, and so are the scan's own
  temporary files; those left by a killed run are deleted on the way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .files import is_temp, remove_stale_temps

#: File extensions picked up when a folder is scanned (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".apng")
#: Video extensions picked up as well: checked frame by frame (animations are found by content).
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv")


@dataclass
class Found:
    """One entry to scan: a file, or something that could not be scanned (``error``)."""

    path: str                 # absolute path, as found (links not resolved)
    rel: Path                 # where it goes below --out / --move-flagged
    size: int | None = None
    mtime_ns: int | None = None
    error: str | None = None  # set when it cannot be read at all
    link: bool = False        # ``path`` is a symbolic link to a file (never overwritten)
    movable: bool = True      # a file or link that --move-flagged may move (never a folder)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


def walk(roots: Sequence[str], exclude: Sequence[str] = ()) -> Iterator[Found]:
    """Every entry to scan under ``roots``, in a stable order, each with its size and mtime.

    Args:
        roots: files and folders from the command line.
        exclude: real paths of folders whose contents are never scanned (outputs).
    """
    exclude = [os.path.realpath(p) for p in exclude]
    real_roots = [os.path.realpath(r) for r in roots if os.path.isdir(r)]
    seen: set[str] = set()

    def excluded(real: str) -> bool:
        return any(_inside(real, e) for e in exclude)

    def reached(real: str) -> bool:
        """Whether the walk of the folder roots reaches the real file ``real`` on its own."""
        return (_is_image(real) and not is_temp(os.path.basename(real)) and not excluded(real)
                and any(_inside(real, r) for r in real_roots))

    def entry(path: str, rel: Path) -> Found | None:
        real = os.path.realpath(path)
        if real in seen:
            return None
        seen.add(real)
        return _stat(Found(os.path.abspath(path), rel, link=os.path.islink(path)))

    for arg in roots:
        top = str(arg)
        if not os.path.isdir(top):
            if not os.path.lexists(top):
                yield Found(os.path.abspath(top), Path(os.path.basename(top)),
                            error=f"error: {top!r} does not exist", movable=False)
            elif is_temp(os.path.basename(top)):
                yield Found(os.path.abspath(top), Path(os.path.basename(top)), movable=False,
                            error="error: a temporary file of a running nsfw-safety scan: not scanned")
            elif (found := entry(top, Path(os.path.basename(top)))) is not None:
                yield found
            continue
        problems: list[OSError] = []
        for folder, dirs, names in os.walk(top, onerror=problems.append):
            for e in problems:  # a folder that could not be listed: its images are unchecked
                yield Found(os.path.abspath(e.filename or folder), Path(os.path.relpath(e.filename or folder, top)),
                            error=f"error: cannot list folder: {e.strerror or e}", movable=False)
            problems.clear()
            keep = []
            for d in sorted(dirs):
                path = os.path.join(folder, d)
                real = os.path.realpath(path)
                if excluded(real):
                    continue
                if os.path.islink(path):
                    if not any(_inside(real, r) for r in real_roots):
                        yield Found(os.path.abspath(path), Path(os.path.relpath(path, top)), movable=False,
                                    error=f"error: link to a folder outside the scanned folders ({real}): "
                                          f"not followed; pass that folder as a PATH to scan it")
                    continue  # inside: its files are scanned under their real path
                keep.append(d)
            dirs[:] = keep
            remove_stale_temps(folder, [n for n in names if is_temp(n)])
            for name in sorted(names):
                if is_temp(name) or not _is_image(name):
                    continue
                path = os.path.join(folder, name)
                if os.path.islink(path) and os.path.exists(path) and reached(os.path.realpath(path)):
                    continue  # the real file is scanned in its own right
                found = entry(path, Path(os.path.relpath(path, top)))
                if found is not None:
                    yield found
        for e in problems:  # the root itself could not be listed
            yield Found(os.path.abspath(top), Path(os.path.basename(top)), movable=False,
                        error=f"error: cannot list folder: {e.strerror or e}")


def _stat(f: Found) -> Found:
    try:
        st = os.stat(f.path)
        f.size, f.mtime_ns = st.st_size, st.st_mtime_ns
    except OSError as e:
        f.error = f"error: cannot stat: {e.strerror or e}"
    return f
