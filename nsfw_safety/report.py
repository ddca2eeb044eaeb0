"""Scan reports: CSV / JSON Lines rows written batch by batch, and a self-contained HTML page.

A report row describes one file (see ``COLUMNS``). Rows are appended and flushed per batch,
so an interrupted scan leaves a valid report; a re-run reads it back to skip files already
scored, keyed by (path, size, mtime_ns). When a file was scored again, the newest row wins.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from .levels import LEVELS, NSFW_LEVELS

#: One row per file. ``status`` is "ok", "flagged" or "error"; ``flagged`` is True for
#: "flagged" and "error" (fail closed: an unchecked file never counts as clean).
COLUMNS = ("path", "size", "mtime_ns", "width", "height", "status", "flagged", *LEVELS,
           "reason", "action", "output", "moved_to")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INTS = ("size", "mtime_ns", "width", "height")


def report_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"jsonl"`` from the file name, or raise ``ValueError``."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"report {str(path)!r} must end in one of {sorted(FORMATS)}")
    return fmt


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
        for k in ("reason", "action", "output", "moved_to"):
            row[k] = row[k] or ""
        return row
    except (TypeError, ValueError):
        return None


def read_report(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete rows of an existing report, in file order (incomplete lines are skipped)."""
    fmt = report_format(path)
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
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


class ReportWriter:
    """Append rows to a CSV or JSONL report, flushed to disk on every :meth:`write`.

    An existing report is appended to; a trailing partial line (from a killed run) is cut
    off first. A CSV whose header is not ours, or a JSONL file that is not a report, is refused
    rather than appended to.
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
            obj = _json_or_none(first) if first else {"path": ""}
            ok = isinstance(obj, dict) and {"path", "status", "mtime_ns"} <= obj.keys()
        if not ok:
            raise ValueError(f"{str(self.path)!r} exists and is not an nsfw-safety {self.format} report: "
                             f"choose another --report file")

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (dicts with ``COLUMNS`` keys) and flush them to disk."""
        if not rows:
            return
        buf = io.StringIO()
        if self.format == "csv":
            writer = csv.writer(buf)
            for row in rows:
                writer.writerow([_csv_value(row[k]) for k in COLUMNS])
        else:
            for row in rows:
                buf.write(json.dumps({k: row[k] for k in COLUMNS}, ensure_ascii=False) + "\n")
        self._fh.write(buf.getvalue())
        self._sync()

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def compact(self) -> None:
        """Rewrite the report with one row per path (the newest), atomically; a no-op when
        there is nothing to drop."""
        self._fh.close()
        rows = read_report(self.path)
        kept = list(latest_rows(rows).values())
        if len(kept) == len(rows):
            return
        tmp = _temp_beside(self.path, f".tmp{self.path.suffix}")
        try:
            writer = ReportWriter(tmp)
            writer.write(kept)
            writer.close()
            os.replace(tmp, self.path)
        except BaseException:
            os.remove(tmp)
            raise


def _temp_beside(path: Path, suffix: str) -> str:
    """A new empty file next to ``path`` (same file system, so ``os.replace`` is atomic), with
    the permissions a plain ``open`` would give it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6f}"
    return v


# --- HTML ------------------------------------------------------------------------------------

def thumbnail_uri(image: Image.Image, size: int = 192) -> str:
    """A JPEG ``data:`` URI of ``image`` shrunk to fit ``size`` x ``size`` (alpha over grey)."""
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (200, 200, 200, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#f5f5f7}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.meta{color:#555;margin-bottom:16px}.meta code{background:#e8e8ed;padding:1px 5px;border-radius:4px}
.stats{display:flex;gap:12px;flex-wrap:wrap}
.stat{background:#fff;border-radius:10px;padding:10px 16px;box-shadow:0 1px 2px #0002;min-width:90px}
.stat b{display:block;font-size:22px}.stat.bad b{color:#c0262d}.stat.err b{color:#a15c00}
.hist{display:flex;gap:16px;flex-wrap:wrap}
.hist figure{margin:0;background:#fff;border-radius:10px;padding:8px 10px;box-shadow:0 1px 2px #0002}
.hist figcaption{font-weight:600;text-transform:capitalize}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{background:#fff;border-radius:10px;padding:8px;box-shadow:0 1px 2px #0002;border-top:4px solid #2e9d57}
.card.flagged{border-top-color:#c0262d}.card.error{border-top-color:#a15c00}
.thumb{height:192px;display:flex;align-items:center;justify-content:center;background:#e8e8ed;border-radius:6px;overflow:hidden}
.thumb img{width:100%;height:100%;object-fit:contain}.thumb span{color:#777;font-size:12px;padding:8px;text-align:center}
.path{font:12px ui-monospace,Menlo,Consolas,monospace;word-break:break-all;margin:6px 0 4px}
.reason{font-size:12px;color:#444}.card.flagged .reason{color:#c0262d;font-weight:600}
.bars{margin:4px 0}.bar{display:flex;align-items:center;gap:6px;font-size:11px;color:#555}
.bar i{flex:1;height:6px;background:#e8e8ed;border-radius:3px;position:relative;overflow:hidden}
.bar i s{position:absolute;left:0;top:0;bottom:0;background:#6e6e73}
.card.flagged .bar i s{background:#c0262d}.bar em{width:34px;text-align:right;font-style:normal}
.bar label{width:48px}
table{border-collapse:collapse;background:#fff;border-radius:10px;overflow:hidden;box-shadow:0 1px 2px #0002}
td,th{padding:6px 10px;text-align:left;border-bottom:1px solid #eee;font-size:13px}
td.path{font-size:12px}
.none{color:#777}
"""


class HtmlReport:
    """Collects one entry per file and writes one self-contained HTML page.

    Thumbnails are embedded as base64 JPEGs: flagged images are shown as the filter
    censored them. Entries are spooled to temporary files as they come, so memory stays
    flat on large folders.

    Args:
        path: the HTML file to write (replaced atomically by :meth:`write`).
        rules: the policy's (level -> threshold) rules, drawn on the histograms.
        thumb_size: longest thumbnail side in pixels.
    """

    def __init__(self, path: str | os.PathLike, rules: dict[str, float], thumb_size: int = 192):
        self.path = Path(path)
        self.rules = rules
        self.thumb_size = thumb_size
        self._spools = {s: tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", encoding="utf-8")
                        for s in ("flagged", "ok")}
        self._counts = {"flagged": 0, "ok": 0}
        self._scores: list[list[float]] = []
        self._errors: list[tuple[str, str, str]] = []

    def add(self, row: dict[str, Any], image: Image.Image | None) -> None:
        """Add the entry of one file.

        Args:
            row: its report row.
            image: what to show: the censored image for a flagged file, the image itself
                for a clean one; None when there is none (an error, or scored in an earlier run).
        """
        path = _display_path(row["path"])
        if row["status"] == "error":
            self._errors.append((row["path"], row["reason"], row["moved_to"]))
            return
        self._scores.append([row[k] for k in NSFW_LEVELS])
        kind = row["status"]
        if image is not None:
            thumb = f'<img src="{thumbnail_uri(image, self.thumb_size)}" alt="">'
        else:
            thumb = "<span>no thumbnail: scored in an earlier run</span>"
        bars = "".join(
            f'<div class="bar"><label>{k}</label><i><s style="width:{100 * row[k]:.1f}%"></s></i>'
            f"<em>{row[k]:.2f}</em></div>" for k in LEVELS)
        action = row["action"] if row["action"] != "none" else ""
        where = row["moved_to"] or row["output"]
        self._spools[kind].write(
            f'<div class="card entry {kind}" data-path="{_e(row["path"])}" data-status="{kind}">'
            f'<div class="thumb">{thumb}</div><div class="path">{_e(path)}</div>'
            f'<div class="bars">{bars}</div><div class="reason">{_e(row["reason"])}</div>'
            + (f'<div class="reason">{_e(action)}{" &rarr; " + _e(_display_path(where)) if where else ""}</div>'
               if action else "")
            + "</div>\n")
        self._counts[kind] += 1

    def write(self, summary: dict[str, Any]) -> None:
        """Write the page: summary, histograms, errors, flagged then clean entries."""
        parts = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width,initial-scale=1'>",
            f"<title>nsfw-safety scan report</title><style>{_CSS}</style></head><body>",
            "<h1>nsfw-safety scan report</h1>",
            f"<div class='meta'>{_e(time.strftime('%Y-%m-%d %H:%M:%S'))} &middot; model <code>"
            f"{_e(str(summary.get('model', '')))}</code> &middot; flagged when "
            f"{_e(' or '.join(f'{k} ≥ {v:.2f}' for k, v in self.rules.items()))}</div>",
            "<div class='stats'>",
            _stat("files", summary.get("files", 0)),
            _stat("flagged", summary.get("flagged", 0), "bad"),
            _stat("clean", summary.get("clean", 0)),
            _stat("errors", summary.get("errors", 0), "err"),
            _stat("images/s", f"{summary.get('images_per_second', 0):.1f}"),
            "</div><h2>Level scores</h2><p class='meta'>Images per score bin; the dashed line is the "
            "threshold.</p><div class='hist'>",
            *(self._histogram(k) for k in NSFW_LEVELS),
            "</div>",
        ]
        if self._errors:
            parts.append(f"<h2>Errors ({len(self._errors)})</h2><table><tr><th>file</th><th>reason</th></tr>")
            for path, reason, moved in self._errors:
                moved_note = f" (moved to {_e(_display_path(moved))})" if moved else ""
                parts.append(f'<tr class="entry error" data-status="error" data-path="{_e(path)}">'
                             f'<td class="path">{_e(_display_path(path))}</td><td>{_e(reason)}{moved_note}</td></tr>')
            parts.append("</table>")
        tmp = _temp_beside(self.path, ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                out.write("\n".join(parts))
                for kind, title in (("flagged", "Flagged"), ("ok", "Clean")):
                    out.write(f"<h2>{title} ({self._counts[kind]})</h2>")
                    if not self._counts[kind]:
                        out.write("<p class='none'>none</p>")
                        continue
                    out.write("<div class='grid'>\n")
                    spool = self._spools[kind]
                    spool.seek(0)
                    for line in spool:
                        out.write(line)
                    out.write("</div>")
                out.write("</body></html>\n")
            os.replace(tmp, self.path)
        except BaseException:
            os.remove(tmp)
            raise

    def close(self) -> None:
        for spool in self._spools.values():
            spool.close()

    def _histogram(self, level: str, bins: int = 20) -> str:
        """An inline SVG histogram of one level's scores over [0, 1], threshold dashed."""
        col = NSFW_LEVELS.index(level)
        counts = [0] * bins
        for s in self._scores:
            counts[min(bins - 1, int(s[col] * bins))] += 1
        w, h, pad_l, pad_b = 300, 130, 30, 18
        top = max(counts) or 1
        bw = (w - pad_l - 6) / bins
        bars = "".join(
            f'<rect x="{pad_l + i * bw + 1:.1f}" y="{h - pad_b - (h - pad_b - 8) * c / top:.1f}" '
            f'width="{bw - 2:.1f}" height="{(h - pad_b - 8) * c / top:.1f}" fill="#6e6e73">'
            f"<title>{i / bins:.2f}-{(i + 1) / bins:.2f}: {c}</title></rect>"
            for i, c in enumerate(counts) if c)
        line = ""
        if level in self.rules:
            x = pad_l + (w - pad_l - 6) * self.rules[level]
            line = (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="4" y2="{h - pad_b}" stroke="#c0262d" '
                    f'stroke-dasharray="4 3" stroke-width="1.5"/>')
        axis = (f'<line x1="{pad_l}" x2="{w - 6}" y1="{h - pad_b}" y2="{h - pad_b}" stroke="#999"/>'
                f'<text x="{pad_l}" y="{h - 4}" font-size="10" text-anchor="middle">0</text>'
                f'<text x="{pad_l + (w - pad_l - 6) / 2:.1f}" y="{h - 4}" font-size="10" text-anchor="middle">0.5</text>'
                f'<text x="{w - 6}" y="{h - 4}" font-size="10" text-anchor="end">1</text>'
                f'<text x="{pad_l - 4}" y="12" font-size="10" text-anchor="end">{top}</text>'
                f'<text x="{pad_l - 4}" y="{h - pad_b}" font-size="10" text-anchor="end">0</text>')
        return (f'<figure><figcaption>{level}</figcaption><svg width="{w}" height="{h}" '
                f'viewBox="0 0 {w} {h}" role="img" aria-label="histogram of {level} scores">'
                f"{bars}{line}{axis}</svg></figure>")


def _stat(name: str, value: Any, cls: str = "") -> str:
    return f"<div class='stat {cls}'><b>{_e(str(value))}</b>{_e(name)}</div>"


def _e(s: str) -> str:
    return html.escape(str(s), quote=True)


def _display_path(path: str) -> str:
    """Relative to the working directory when below it, else as is."""
    if not path:
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel
