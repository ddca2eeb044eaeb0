"""The HTML review page: one self-contained file with thumbnails, scores and histograms.

Flagged images are shown as the filter censored them; in region mode, each censored region's
box is outlined on the censored thumbnail, with its class. Thumbnails are kept beside the report
(``<report>.thumbs/``, one small JPEG per row, censored for flagged images), so the page of a
resumed scan still shows the files scored in earlier runs.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, ImageDraw

from ..vocabulary import LEVELS, NSFW_LEVELS
from .files import is_temp, write_atomic
from .reports import encode_path


#: The colour of region outlines: magenta, which stands out on black fills, grey cards and blurs.
OUTLINE = (255, 0, 255)


def thumbnail_jpeg(image: Image.Image, size: int = 192, regions: Iterable[dict[str, Any]] = ()) -> bytes:
    """``image`` shrunk to fit ``size`` x ``size`` (alpha over grey), as JPEG bytes.

    Args:
        regions: boxes to outline, each ``{"label", "box": [x1, y1, x2, y2]}`` in ``image``'s
            pixels (a report row's regions); only ever those of a censored image.
    """
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (200, 200, 200, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    regions = list(regions)
    _outline(im, regions, im.width / image.width, im.height / image.height)
    buf = io.BytesIO()
    # full-resolution colour when outlined: 4:2:0 subsampling smears a 2-pixel line into its neighbours
    im.save(buf, "JPEG", quality=75, **({"subsampling": 0} if regions else {}))
    return buf.getvalue()


def _outline(im: Image.Image, regions: Iterable[dict[str, Any]], sx: float, sy: float) -> None:
    """Draw each region's box (scaled by ``sx``, ``sy``) on ``im``: a 2-pixel outline, its class
    in a black tab inside the top left corner."""
    draw = ImageDraw.Draw(im)
    for r in regions:
        x1, y1, x2, y2 = r["box"]
        left, top = round(x1 * sx), round(y1 * sy)
        right, bottom = max(left, round(x2 * sx) - 1), max(top, round(y2 * sy) - 1)
        draw.rectangle((left, top, right, bottom), outline=OUTLINE, width=2)
        # a model's own class names: printable ASCII (Pillow 10's bitmap font has nothing else), and short
        label = "".join(c if " " <= c <= "~" else "?" for c in r["label"][:40])
        tab = draw.textbbox((left + 3, top + 3), label)
        draw.rectangle((tab[0] - 1, tab[1] - 1, tab[2] + 1, tab[3] + 1), fill=(0, 0, 0))
        draw.text((left + 3, top + 3), label, fill=OUTLINE)


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class ThumbStore:
    """Thumbnails kept beside a report: ``<folder>/<key>.jpg``, key = hash of (path, size, mtime)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @staticmethod
    def key(row: dict[str, Any]) -> str:
        ident = f"{encode_path(row['path'])}\0{row['size']}\0{row['mtime_ns']}"
        return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]

    def put(self, row: dict[str, Any], jpeg: bytes) -> None:
        write_atomic(self.folder / f"{self.key(row)}.jpg", lambda fh: fh.write(jpeg), overwrite=True, sync=False)

    def get(self, row: dict[str, Any]) -> bytes | None:
        try:
            return (self.folder / f"{self.key(row)}.jpg").read_bytes()
        except OSError:
            return None

    def prune(self, rows: Iterable[dict[str, Any]]) -> None:
        """Delete the thumbnails of rows that are no longer in the report."""
        if not self.folder.is_dir():
            return
        keep = {f"{self.key(r)}.jpg" for r in rows}
        for p in self.folder.iterdir():
            if p.name not in keep and (p.suffix == ".jpg" or is_temp(p.name)):
                p.unlink(missing_ok=True)



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
.none{color:#777}.models{font-size:11px;color:#555;margin-top:2px}
"""


class HtmlReport:
    """Collects one entry per file and writes one self-contained HTML page.

    Thumbnails are embedded as base64 JPEGs: flagged images are shown as the filter
    censored them. Entries are spooled to temporary files as they come, so memory stays
    flat on large folders.

    Args:
        path: the HTML file to write (replaced atomically by :meth:`write`).
        rules: the policy's (level -> threshold) rules, drawn on the histograms.
        thumbs: where thumbnails are kept between runs (beside the report), or None.
        thumb_size: longest thumbnail side in pixels.
    """

    def __init__(self, path: str | os.PathLike, rules: dict[str, float], thumbs: ThumbStore | None = None,
                 thumb_size: int = 192):
        self.path = Path(path)
        self.rules = rules
        self.thumbs = thumbs
        self.thumb_size = thumb_size
        self._spools = {s: tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", encoding="utf-8")
                        for s in ("flagged", "ok", "earlier")}
        self._counts = {"flagged": 0, "ok": 0, "earlier": 0}
        self._scores: list[list[float]] = []
        self._errors: list[tuple[str, str, str]] = []

    def add(self, row: dict[str, Any], image: Image.Image | None, earlier: bool = False) -> None:
        """Add the entry of one file.

        Args:
            row: its report row.
            image: what to show: the censored image for a flagged file, the image itself
                for a clean one; None for an error, or a file scored in an earlier run (whose
                thumbnail is then taken from ``thumbs``). The regions of a flagged row are
                outlined on it: it must be the censored image.
            earlier: a row of the report for a file that is no longer under the scanned paths
                (moved to the quarantine, or removed); listed apart, outside the statistics.
        """
        kind = row["status"]
        if kind == "error" and not earlier:
            self._errors.append((row["path"], row["reason"], row["moved_to"]))
            return
        jpeg = None
        if image is not None:
            jpeg = thumbnail_jpeg(image, self.thumb_size, (kind == "flagged" and row.get("regions")) or ())
            if self.thumbs is not None:
                self.thumbs.put(row, jpeg)
        elif self.thumbs is not None and kind != "error":
            jpeg = self.thumbs.get(row)
        if jpeg is not None:
            thumb = f'<img src="{_data_uri(jpeg)}" alt="">'
        else:
            thumb = f"<span>{'not checked' if kind == 'error' else 'no thumbnail: scored in an earlier run'}</span>"
        bars = "" if kind == "error" else "".join(
            f'<div class="bar"><label>{k}</label><i><s style="width:{100 * row[k]:.1f}%"></s></i>'
            f"<em>{row[k]:.2f}</em></div>" for k in LEVELS)
        action = row["action"] if row["action"] != "none" else ""
        where = row["moved_to"] or row["output"]
        self._spools["earlier" if earlier else kind].write(
            f'<div class="card entry {kind}" data-path="{_e(encode_path(row["path"]))}" data-status="{kind}">'
            f'<div class="thumb">{thumb}</div><div class="path">{_e(_display_path(row["path"]))}</div>'
            f'<div class="bars">{bars}</div><div class="reason">{_e(row["reason"])}</div>'
            + (f'<div class="models">{_e(row["models"])}</div>' if row.get("models") else "")  # a second opinion
            + (f'<div class="reason">{_e(action)}{" &rarr; " + _e(_display_path(where)) if where else ""}</div>'
               if action else "")
            + "</div>\n")
        if earlier:
            self._counts["earlier"] += 1
        else:
            self._scores.append([row[k] for k in NSFW_LEVELS])
            self._counts[kind] += 1

    def write(self, summary: dict[str, Any]) -> None:
        """Write the page: summary, histograms, errors, flagged then clean entries."""
        parts = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width,initial-scale=1'>",
            f"<title>nsfw-safety scan report</title><style>{_CSS}</style></head><body>",
            "<h1>nsfw-safety scan report</h1>",
            f"<div class='meta'>{_e(time.strftime('%Y-%m-%d %H:%M:%S'))} &middot; model <code>"
            f"{_e(str(summary.get('model', '')))}</code>"
            + (f" revision <code>{_e(summary['revision'])}</code>" if summary.get("revision") else "")
            + " &middot; flagged when "
            f"{_e(' or '.join(f'{k} ≥ {v:.2f}' for k, v in self.rules.items()))}"
            + (f" &middot; region mode <code>{_e(summary['regions'])}</code> (censored regions outlined)"
               if summary.get("regions") else "") + "</div>",
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
                parts.append(f'<tr class="entry error" data-status="error" data-path="{_e(encode_path(path))}">'
                             f'<td class="path">{_e(_display_path(path))}</td><td>{_e(reason)}{moved_note}</td></tr>')
            parts.append("</table>")

        def page(fh) -> None:
            out = io.TextIOWrapper(fh, encoding="utf-8")
            out.write("\n".join(parts))
            for kind, title in (("flagged", "Flagged"), ("ok", "Clean"),
                                ("earlier", "In the report, no longer under the scanned paths (moved or removed)")):
                if kind == "earlier" and not self._counts[kind]:
                    continue
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
            out.flush()
            out.detach()

        write_atomic(self.path, page, overwrite=True)

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
    """Relative to the working directory when below it, else as is; encoded as in the report."""
    if not path:
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        rel = path
    return encode_path(path if rel.startswith("..") else rel)
