"""The per-frame report of a scan (``--frames-report PATH.jsonl``): one JSON line per checked
frame of each animation or video; still images have none (their row in the report is all there is).

A line holds the file's ``path`` (escaped as in the report), ``size`` and ``mtime_ns`` (which
version of the file it describes), the ``frame`` index, its ``time`` in seconds (null where the
file gives none), the scores of every level (null for a frame that could not be scored), whether
the frame is ``flagged`` by its own scores, and the policy's ``reason``.

Durability follows the report's: a file's lines are appended and fsynced as soon as it is checked,
before the rows of its batch, so a report row always comes after its file's lines. A run starts by
keeping only the lines of files whose report row still holds and that it will not score again;
the rest (lines of files a killed run scored but never recorded, of files scored again, a torn
last line) are dropped, in one atomic rewrite. A file is skipped only if all its lines are there
(as many as the frames its row says were checked), so a resumed run neither repeats nor loses
lines. Without ``--report`` nothing is resumed: each run starts the file afresh. One run writes
it at a time (a lock beside it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..vocabulary import LEVELS
from .files import remove_stale_temps, write_atomic
from .reports import FORMATS, ReportError, ReportLock, _text, decode_path, encode_path, report_format

FIELDS = ("path", "size", "mtime_ns", "frame", "time", *LEVELS, "flagged", "reason")

Key = tuple[str, int, int]  # (path, size, mtime_ns)


def frame_lines(path: str, size: int, mtime_ns: int, result: Any) -> Iterator[dict[str, Any]]:
    """One line per checked frame of ``result`` (a :class:`~nsfw_safety.video.VideoResult`), made
    as they are written: a long video's lines are never all held at once."""
    if result.scores is None:
        return
    levels = result.scores.levels.float().cpu().tolist()
    valid = result.scores.valid.cpu().tolist()
    hit = set(result.flagged_frames)
    for i, t, scores, ok, reason in zip(result.checked, result.frame_times, levels, valid, result.frame_reasons):
        yield {"path": path, "size": size, "mtime_ns": mtime_ns, "frame": i, "time": t,
               **dict(zip(LEVELS, scores if ok else [None] * len(LEVELS))), "flagged": i in hit, "reason": reason}


def _key(line: dict[str, Any]) -> Key | None:
    """The file version a line read back describes; None when it is not a complete line."""
    try:
        if set(FIELDS) <= line.keys() and isinstance(line["frame"], int):
            return decode_path(line["path"]), int(line["size"]), int(line["mtime_ns"])
    except (TypeError, ValueError, AttributeError):
        pass
    return None


class FramesReport:
    """The per-frame JSONL of one run: opened (and locked) before the walk's files are sorted
    into skipped and to-do, pruned once that is known, then appended to batch by batch."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if report_format(self.path) != "jsonl":
            raise ValueError(f"a frames report must end in {' or '.join(k for k, v in FORMATS.items() if v == 'jsonl')}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = ReportLock(self.path)
        self._fh = None
        self.counts: dict[Key, int] = {}  # complete lines per file version
        self._broken = 0  # lines that are no data (a torn last line)
        try:
            remove_stale_temps(self.path.parent)  # a rewrite's, from a killed run
            for key, _ in self._read():
                if key is None:
                    self._broken += 1
                else:
                    self.counts[key] = self.counts.get(key, 0) + 1
        except BaseException:
            self._lock.release()
            raise

    def _read(self) -> Iterator[tuple[Key | None, bytes]]:
        """(key, raw line) for every line; raises :class:`ReportError` for a file not ours."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            for n, raw in enumerate(fh):
                try:
                    line = json.loads(raw) if raw.endswith(b"\n") else None  # a torn last line is no data
                except ValueError:
                    line = None
                key = _key(line) if isinstance(line, dict) else None
                if n == 0 and key is None and not (line is None and raw.startswith(b'{"path": ')):
                    raise ReportError(f"{str(self.path)!r} exists and is not an nsfw-safety frames report: "
                                      f"choose another --frames-report file")
                yield key, raw

    def complete(self, row: dict[str, Any]) -> bool:
        """Whether a report row's lines are all here (a still image's row needs none)."""
        if not row["frames"]:
            return True
        checked = int(row["frames"].split("/")[0])
        return self.counts.get((row["path"], row["size"], row["mtime_ns"]), 0) == checked

    def start(self, keep: Callable[[Key], bool]) -> None:
        """Keep only the lines whose file version ``keep`` accepts (rewriting the file atomically
        when any line goes), then open it for appending."""
        if self._broken or any(not keep(key) for key in self.counts):
            def write(fh) -> None:
                for key, raw in self._read():
                    if key is not None and keep(key):
                        fh.write(raw)

            write_atomic(self.path, write, overwrite=True, keep=self.path.stat())
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, lines: Iterable[dict[str, Any]]) -> None:
        """Append ``lines`` (from :func:`frame_lines`) and sync them to disk."""
        for line in lines:
            self._fh.write(json.dumps({**line, "path": encode_path(line["path"]), "reason": _text(line["reason"])},
                                      ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._lock.release()
