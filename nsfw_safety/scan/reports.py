"""Scan reports: CSV or JSON Lines rows, written batch by batch, one writer at a time.

A row describes one file (see ``COLUMNS``), including the settings that scored it (model,
revision, rules, second opinion), so a report never mixes two settings: a run whose settings
differ from the report's is refused (:func:`check_settings`). Rows are appended and fsynced
per batch, so a killed scan leaves a valid report; a re-run reads it back to skip files already
scored, keyed by (path, size, mtime_ns). When a file was scored again, the newest row wins.

With a second opinion (``nsfw_safety.cascade``), each model's own scores go in the row: as text
in ``models`` (:func:`models_text`), and in JSONL also as ``parts``, in the shape of the server's
JSON (a list, one ``{"model", "scored", "levels", "probs", "problem"}`` per model, in order).

Paths are text. One that is not valid UTF-8, or holds control characters, is written
quoted, the way git quotes file names: ``"`` + the name with ``\\xNN`` for each such byte and
``\\\\``, ``\\"`` for a backslash and a quote + ``"``. :func:`decode_path` reverses it exactly.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from ..vocabulary import LEVELS, NSFW_LEVELS
from . import ScanError
from .files import write_atomic

#: A second opinion's settings columns: its model id, band (``LO,HI``; empty for ``any``/``all``)
#: and rule; empty without one. ``models`` (after them) gives each model's own scores, as text.
SECOND_OPINION = ("second_opinion", "band", "combine")
#: One row per file. ``status`` is "ok", "flagged" or "error"; ``flagged`` is True for
#: "flagged" and "error" (fail closed: an unchecked file never counts as clean). ``regions``:
#: None when region mode is off or the file was not read, else a list (see :func:`regions_cell`).
COLUMNS = ("path", "size", "mtime_ns", "width", "height", "frames", "status", "flagged", *LEVELS,
           "reason", "action", "output", "moved_to", "model", "revision", "rules",
           *SECOND_OPINION, "models", "regions", "region_settings")
#: The columns that say how a row was scored; every row of a report has the same.
SETTINGS = ("model", "revision", "rules", *SECOND_OPINION, "region_settings")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INTS = ("size", "mtime_ns", "width", "height")
_TEXT = ("frames", "reason", "action", "output", "moved_to", "model", "revision", "rules",
         *SECOND_OPINION, "models", "region_settings")
_PATHS = ("path", "output", "moved_to")


class ReportError(ScanError):
    """The report cannot be used; the message says why and what to do."""


def report_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"jsonl"`` from the file name, or raise ``ValueError``."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"report {str(path)!r} must end in one of {sorted(FORMATS)}")
    return fmt


# --- paths as text ---------------------------------------------------------------------------

_NEEDS_QUOTES = re.compile(r'[\x00-\x1f\x7f\udc80-\udcff]|^"')
_ESCAPE = re.compile(r'[\x00-\x1f\x7f\udc80-\udcff\\"]')
_UNESCAPE = re.compile(r'\\(x[0-9a-f]{2}|\\|")')


def encode_path(path: str) -> str:
    """A path as valid text: unchanged, unless it holds bytes that are not UTF-8 (read by
    Python as ``\\udcNN``), control characters, or starts with a quote; then it is quoted."""
    if not path or _NEEDS_QUOTES.search(path) is None:
        return path

    def esc(m: re.Match) -> str:
        c = m.group()
        if c in '\\"':
            return "\\" + c
        return f"\\x{ord(c) - 0xDC00 if ord(c) >= 0xDC80 else ord(c):02x}"

    return '"' + _ESCAPE.sub(esc, path) + '"'


def decode_path(text: str) -> str:
    """The inverse of :func:`encode_path`: ``os.fsencode(decode_path(t))`` is the file's name."""
    if len(text) < 2 or not (text.startswith('"') and text.endswith('"')):
        return text
    out = bytearray()
    pos = 0
    body = text[1:-1]
    for m in _UNESCAPE.finditer(body):
        out += body[pos:m.start()].encode("utf-8", "surrogateescape")
        g = m.group(1)
        out += bytes([int(g[1:], 16)]) if g.startswith("x") else g.encode()
        pos = m.end()
    out += body[pos:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(out))


def _text(value: str) -> str:
    """Free text (a reason) as valid UTF-8; undecodable bytes shown as ``\\xNN``."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --- reading ---------------------------------------------------------------------------------

def _clean_row(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A row read back from disk, typed; None when it is not a complete report row."""
    try:
        row: dict[str, Any] = {k: raw.get(k) for k in COLUMNS}
        if not row["path"] or row["status"] not in ("ok", "flagged", "error"):
            return None
        for k in _INTS:
            row[k] = None if row[k] in (None, "") else int(row[k])
        if row["status"] != "error" and (row["size"] is None or row["mtime_ns"] is None):
            return None  # a scored row always has them (a file that cannot be stat'ed is an error)
        for k in LEVELS:
            row[k] = None if row[k] in (None, "") else float(row[k])
        flagged = row["flagged"]
        row["flagged"] = flagged if isinstance(flagged, bool) else str(flagged).lower() == "true"
        for k in _TEXT:
            row[k] = row[k] or ""
        for k in _PATHS:
            row[k] = decode_path(row[k] or "")
        row["regions"] = _read_regions(row["regions"])
        parts = raw.get("parts")  # JSONL only
        row["parts"] = parts if isinstance(parts, list) else None
        return row
    except (TypeError, ValueError, AttributeError):
        return None


# --- regions -------------------------------------------------------------------------------

def regions_cell(regions: list[dict[str, Any]] | None) -> str:
    """The CSV form of a row's regions: ``""`` for None, else compact JSON, one
    ``[label, score, x1, y1, x2, y2]`` per region (score to 4 decimals, box to 0.1 pixel), e.g.
    ``[["BUTTOCKS_EXPOSED",0.5812,317.6,114.4,663.9,443.2]]``; ``[]`` for none."""
    if regions is None:
        return ""
    return json.dumps([[r["label"], round(r["score"], 4), *(round(v, 1) for v in r["box"])] for r in regions],
                      ensure_ascii=False, separators=(",", ":"))


def _read_regions(value: Any) -> list[dict[str, Any]] | None:
    """A row's regions as read back: JSONL's list of ``{"label", "score", "box"}``, or a CSV cell
    (:func:`regions_cell`); ``ValueError`` when it is neither."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [{"label": r[0], "score": r[1], "box": r[2:]} for r in json.loads(value)]
    if not isinstance(value, list):
        raise ValueError(f"regions must be a list, got {value!r}")
    out = []
    for r in value:
        box = [float(v) for v in r["box"]]
        if not isinstance(r["label"], str) or len(box) != 4:
            raise ValueError(f"not a region: {r!r}")
        out.append({"label": r["label"], "score": float(r["score"]), "box": box})
    return out


def read_report(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete rows of an existing report, in file order (incomplete lines are skipped)."""
    fmt = report_format(path)
    rows = []
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        if fmt == "csv":
            raw_rows: Iterable[dict] = csv.DictReader(fh)
        else:
            raw_rows = (_json_or_none(line) for line in fh if line.strip())
        for raw in raw_rows:
            row = _clean_row(raw) if isinstance(raw, dict) else None
            if row is not None:
                rows.append(row)
    return rows


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """path -> its newest row."""
    return {row["path"]: row for row in rows}


def describe_settings(settings: dict[str, str]) -> str:
    """``--model M --revision R --thresholds medium=0.5`` (and the second opinion's and region
    mode's flags) for messages."""
    rev = f" --revision {settings['revision']}" if settings["revision"] else ""
    second = ""
    if settings["second_opinion"]:
        band = f" --band {settings['band'].replace(',', ' ')}" if settings["band"] else ""
        second = f" --second-opinion {settings['second_opinion']}{band} --combine {settings['combine']}"
    regions = f" {settings['region_settings']}" if settings["region_settings"] else ""
    return f"--model {settings['model']}{rev} --thresholds {settings['rules']}{second}{regions}"


def check_settings(rows: Iterable[dict[str, Any]], settings: dict[str, str], report: str | os.PathLike) -> None:
    """Raise :class:`ReportError` unless every row was scored with ``settings``."""
    for row in rows:
        theirs = {k: row[k] for k in SETTINGS}
        if theirs != settings:
            raise ReportError(
                f"the report {str(report)!r} was written with {describe_settings(theirs)}, and this run "
                f"asks for {describe_settings(settings)}; a report never mixes the two. Run again with "
                f"the report's settings to resume it, or start fresh: pass another --report, or delete "
                f"{str(report)!r} (and its .thumbs folder)")


# --- writing ---------------------------------------------------------------------------------

class ReportLock:
    """An exclusive lock on a report for one run (``fcntl.flock`` on ``<report>.lock``).

    The lock goes with the process: a killed run holds nothing. The lock file stays.
    """

    def __init__(self, report: str | os.PathLike):
        self.path = Path(f"{report}.lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip()
            os.close(self._fd)
            raise ReportError(
                f"another scan is writing the report {str(report)!r}"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + ": wait for it to finish, or pass another --report") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


class ReportWriter:
    """Append rows to a CSV or JSONL report, synced to disk on every :meth:`write`.

    An existing report is appended to; a trailing partial line (from a killed run) is cut
    off first. A file that is not a report of this version is refused rather than appended to.
    The caller holds the :class:`ReportLock`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.format = report_format(path)
        self._check_existing()
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        if new and self.format == "csv":
            self._fh.write(",".join(COLUMNS) + "\r\n")
            self._sync()

    def _check_existing(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if not data.endswith(b"\n"):  # a killed run's half-written row
                fh.truncate(data.rfind(b"\n") + 1)
                data = data[: data.rfind(b"\n") + 1]
        first = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        if self.format == "csv":
            ok = first == ",".join(COLUMNS)
        else:
            obj = _json_or_none(first) if first else dict.fromkeys(COLUMNS)
            ok = isinstance(obj, dict) and set(COLUMNS) <= obj.keys()
        if not ok:
            raise ReportError(f"{str(self.path)!r} exists and is not an nsfw-safety {self.format} report of this "
                              f"version: choose another --report file")

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (dicts with ``COLUMNS`` keys) and sync them to disk."""
        if rows:
            self._fh.write(format_rows(rows, self.format, header=False))
            self._sync()

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def compact(self) -> list[dict[str, Any]]:
        """Rewrite the report with one row per path (the newest), atomically; returns those rows."""
        self._fh.close()
        rows = read_report(self.path)
        kept = list(latest_rows(rows).values())
        if len(kept) < len(rows):
            text = format_rows(kept, self.format, header=self.format == "csv")
            write_atomic(self.path, lambda fh: fh.write(text.encode("utf-8")), overwrite=True,
                         keep=self.path.stat())
        return kept


def format_rows(rows: list[dict[str, Any]], fmt: str, header: bool) -> str:
    """Rows as report text (paths encoded, free text made valid UTF-8)."""
    buf = io.StringIO()
    if header:
        buf.write(",".join(COLUMNS) + "\r\n")
    if fmt == "csv":
        writer = csv.writer(buf)
        for row in rows:
            cells = {**_encoded(row), "regions": regions_cell(row["regions"])}
            writer.writerow([_csv_value(v) for v in cells.values()])
    else:
        for row in rows:
            obj = _encoded(row)
            if row.get("parts"):
                obj["parts"] = [{**p, "model": _text(p["model"])} for p in row["parts"]]
            buf.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return buf.getvalue()


def _encoded(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in COLUMNS}
    for k in _PATHS:
        out[k] = encode_path(out[k] or "")
    for k in _TEXT:
        if k not in _PATHS:
            out[k] = _text(out[k] or "")
    return out


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6f}"
    return v


# --- a second opinion's parts ------------------------------------------------------------------

def models_text(parts: list[dict[str, Any]] | None) -> str:
    """The ``models`` column: each model's low/medium/high, ``"eva low=0.7000 medium=0.6000
    high=0.4500; vit-sd not scored"``, or its problem; empty for one model."""
    def one(p: dict[str, Any]) -> str:
        if not p["scored"]:
            return f"{p['model']} not scored"
        if p["problem"]:
            return f"{p['model']} {p['problem']}"
        return " ".join([p["model"], *(f"{k}={p['levels'][k]:.4f}" for k in NSFW_LEVELS)])

    return "; ".join(one(p) for p in parts or ())


def frames_parts(frames: list[list[dict[str, Any]]]) -> list[dict[str, Any]] | None:
    """A video's parts from its frames' (``Parts.to_dicts`` rows, one per checked frame): per
    model, each level's maximum over the frames it scored (as the row's levels are the maximum
    over all its frames), ``probs`` None, its first problem; ``scored`` when it scored any frame."""
    if not frames:
        return None
    out = []
    for m, head in enumerate(frames[0]):
        scored = [f[m] for f in frames if f[m]["scored"]]
        levels = {k: max(p["levels"][k] for p in scored) for k in LEVELS} if scored else None
        problem = next((p["problem"] for p in scored if p["problem"]), None)
        out.append({"model": head["model"], "scored": bool(scored), "levels": levels, "probs": None,
                    "problem": problem})
    return out
