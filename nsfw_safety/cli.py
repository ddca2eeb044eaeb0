"""The ``nsfw-safety`` command line.

* ``nsfw-safety scan PATH...``: score every image under the given files and folders, write
  a report, and optionally censored copies, a quarantine, or an HTML page for review.
* ``nsfw-safety serve``: the HTTP server (``nsfw_safety.server``, needs the ``server`` extra).

Exit codes of ``scan``: 0 all clean, 1 some flagged (``--no-fail-on-flagged`` turns this
into 0), 2 errors (unreadable files, bad arguments, a model that cannot load), 130 interrupted.

This is the only module of the package that prints.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, PngImagePlugin

from .censor import ACTIONS
from .detector import load_detector
from .filter import SafetyFilter
from .inputs import open_image
from .levels import LEVELS, NSFW_LEVELS, Policy
from .models import ModelLoadError
from .report import COLUMNS, HtmlReport, ReportWriter, latest_rows, read_report, report_format

log = logging.getLogger(__name__)

#: File extensions picked up when a folder is scanned (case-insensitive). Files named
#: explicitly on the command line are scanned whatever their extension.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: Images with more pixels than this are refused unread (PIL's own warning limit, ~9459^2).
DEFAULT_MAX_PIXELS = 89_478_485
EXIT_CLEAN, EXIT_FLAGGED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
_CENSOR_ACTIONS = tuple(a for a in ACTIONS if a != "none")


# --- arguments -------------------------------------------------------------------------------

def _thresholds(text: str) -> dict[str, float]:
    """``"low=0.9,medium=0.6"`` -> ``{"low": 0.9, "medium": 0.6}`` (checked by Policy)."""
    out = {}
    for part in text.split(","):
        level, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[level.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LEVEL=THRESHOLD[,LEVEL=THRESHOLD...], got {text!r}") from None
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsfw-safety", description="Score images with an NSFW classifier; blur or block what crosses the line.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser(
        "scan", help="scan files and folders of images, write a report and censored copies",
        description="Scan images (png, jpg/jpeg, webp, bmp, tiff, gif first frame) in files and folders "
                    "(recursively). Exit codes: 0 all clean, 1 some flagged, 2 errors, 130 interrupted.")
    scan.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders to scan")
    g = scan.add_argument_group("model")
    g.add_argument("--model", default="eva",
                   help="registry name (eva, vit, vit-sd, falconsai), hub id, or local checkpoint folder (default: eva)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of the model")
    g.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 or auto (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="images per model call (default: 16)")
    g.add_argument("--workers", type=_positive_int, default=min(8, os.cpu_count() or 1),
                   help="parallel image decoders (default: min(8, CPU count))")
    g = scan.add_argument_group("policy")
    g.add_argument("--level", choices=NSFW_LEVELS, help="flag when this level's score >= --threshold (default: medium)")
    g.add_argument("--threshold", type=float, help="threshold in [0, 1] for --level (default: 0.5)")
    g.add_argument("--thresholds", type=_thresholds, metavar="LEVEL=T,...",
                   help="per-level thresholds instead, e.g. low=0.9,medium=0.6: flagged when any level meets its own")
    g.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels than this, unread (default: {DEFAULT_MAX_PIXELS:,})")
    g = scan.add_argument_group("output")
    g.add_argument("--report", type=Path, help="report file, .csv or .jsonl; appended to, and re-runs skip files "
                                               "already in it with the same size and mtime")
    g.add_argument("--html", type=Path, help="write a self-contained HTML page for review")
    g.add_argument("--json", action="store_true", help="print a JSON summary on stdout (the text summary goes to stderr)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no text summary")
    g.add_argument("--no-fail-on-flagged", dest="fail_on_flagged", action="store_false",
                   help="exit 0 instead of 1 when images are flagged (errors still exit 2)")
    g = scan.add_argument_group("actions (originals are never modified unless --in-place is given)")
    g.add_argument("--action", choices=_CENSOR_ACTIONS, default="blur",
                   help="how flagged images are censored in --out copies, --in-place, and the HTML (default: blur)")
    g.add_argument("--out", type=Path, metavar="DIR", help="write censored copies of flagged images here, mirroring the tree")
    g.add_argument("--copy-safe", action="store_true", help="with --out: also copy the unflagged images there")
    g.add_argument("--move-flagged", type=Path, metavar="DIR",
                   help="move flagged originals (and files that could not be checked) here, mirroring the tree")
    g.add_argument("--in-place", action="store_true", help="overwrite flagged originals with their censored version")

    sub.add_parser("serve", add_help=False, help="run the HTTP server (needs nsfw-safety[server]); "
                                                 "see nsfw-safety serve --help")
    return parser


def _check_scan_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Policy:
    if args.thresholds is not None and (args.level is not None or args.threshold is not None):
        parser.error("give either --level/--threshold or --thresholds, not both")
    if args.copy_safe and args.out is None:
        parser.error("--copy-safe needs --out DIR")
    if args.in_place and (args.out is not None or args.move_flagged is not None):
        parser.error("--in-place cannot be combined with --out or --move-flagged")
    if args.out is not None and args.move_flagged is not None and \
            os.path.realpath(args.out) == os.path.realpath(args.move_flagged):
        parser.error("--out and --move-flagged must be different folders")
    for name in ("report", "html"):
        path = getattr(args, name)
        if path is not None and path.is_dir():
            parser.error(f"--{name} {str(path)!r} is a folder: expected a file")
    try:
        if args.report is not None:
            report_format(args.report)
        return Policy(args.level or "medium", 0.5 if args.threshold is None else args.threshold,
                      args.thresholds)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


# --- main --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command != "serve" and extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if args.command == "serve":
            return _serve(extra)
        policy = _check_scan_args(parser, args)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return int(e.code or 0)
    try:
        return _scan(args, policy)
    except KeyboardInterrupt:  # before scanning started (e.g. while the model loads)
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _serve(argv: list[str]) -> int:
    try:
        from . import server  # lazy: fastapi and uvicorn are an optional extra
    except ImportError as e:
        print(f"nsfw-safety serve is not available: {e}\n"
              f"Install the server extra: pip install 'nsfw-safety[server]'", file=sys.stderr)
        return EXIT_ERROR
    parser = argparse.ArgumentParser(prog="nsfw-safety serve", description="Run the nsfw-safety HTTP server.")
    server.add_arguments(parser)
    return int(server.run(parser.parse_args(argv)) or 0)


# --- scan ------------------------------------------------------------------------------------

@dataclass
class _File:
    path: str                # absolute path of the original
    rel: Path                # where it goes below --out / --move-flagged
    size: int | None = None
    mtime_ns: int | None = None
    error: str | None = None  # set when the file cannot even be stat'ed


@dataclass
class _Decoded:
    file: _File
    image: Image.Image | None
    error: str | None


def _walk(paths: Sequence[str], exclude: list[str]) -> Iterator[_File]:
    """Every file to scan, in a stable order; folders below ``exclude`` are skipped."""
    seen: set[str] = set()
    for arg in paths:
        top = Path(arg)
        if top.is_dir():
            for root, dirs, names in os.walk(top):
                dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in exclude)
                for name in sorted(names):
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        path = os.path.join(root, name)
                        found = _File(os.path.abspath(path), Path(os.path.relpath(path, top)))
                        if found.path not in seen:
                            seen.add(found.path)
                            yield found
        elif os.path.abspath(top) not in seen:
            seen.add(os.path.abspath(top))
            error = None if os.path.lexists(top) else f"error: {arg!r} does not exist"
            yield _File(os.path.abspath(top), Path(top.name), error=error)


def _stat(f: _File) -> _File:
    if f.error is None:
        try:
            st = os.stat(f.path)
            f.size, f.mtime_ns = st.st_size, st.st_mtime_ns
        except OSError as e:
            f.error = f"error: cannot stat: {e.strerror or e}"
    return f


def _decode(f: _File, max_pixels: int) -> _Decoded:
    """Runs in a worker thread: open and decode one file (first frame, EXIF orientation)."""
    if f.error is not None:
        return _Decoded(f, None, f.error)
    try:
        if f.size == 0:
            raise ValueError("empty file (0 bytes)")
        return _Decoded(f, open_image(f.path, max_pixels), None)
    except Exception as e:  # any failure is a row with the reason, never a crash or a pass
        msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return _Decoded(f, None, "error: " + _without_path(msg, f.path))


def _without_path(msg: str, path: str) -> str:
    """A one-line reason without the file's own path (the row already names it)."""
    quoted = repr(path)
    if msg.startswith(quoted + " "):
        msg = msg[len(quoted) + 1:]
        msg = msg[3:] if msg.startswith("is ") else "image " + msg
    return " ".join(msg.replace(f" {quoted}", "").split())


def _row(f: _File, **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(path=f.path, size=f.size, mtime_ns=f.mtime_ns, reason="", action="none", output="", moved_to="")
    row.update(values)
    return row


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """Let PIL open images up to ``max_pixels`` (our own check refuses larger ones first)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(old or 0, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _reserve(target: Path) -> Path:
    """Create ``target`` empty (or ``name-1.ext``, ``name-2.ext``... when it exists) and return it.

    Creating it exclusively makes the name ours: nothing that exists is ever overwritten.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        candidate = target if n == 0 else target.with_name(f"{target.stem}-{n}{target.suffix}")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _save_format(path: Path) -> str | None:
    """The PIL format that writes files named like ``path``, or None."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    return fmt if fmt in Image.SAVE else None


def _save(image: Image.Image, original: Image.Image, target: Path) -> None:
    """Encode ``image`` into ``target`` in the format its extension names, keeping the
    original's PNG text chunks (e.g. generation parameters) and ICC profile. EXIF is not
    copied: its embedded thumbnail would show the uncensored image."""
    fmt = _save_format(target) or "PNG"
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
    with open(target, "wb") as fh:
        image.save(fh, format=fmt, **kwargs)


def _censored_name(rel: Path) -> Path:
    return rel if _save_format(rel) else rel.with_name(rel.name + ".png")


class _Tally:
    """Running counts for the summary (rows themselves are not kept: folders can be huge)."""

    def __init__(self, policy: Policy):
        rules = policy.rules
        default = policy.threshold if policy.thresholds is None else 0.5
        self.thresholds = {level: rules.get(level, default) for level in NSFW_LEVELS}
        self.status = {"ok": 0, "flagged": 0, "error": 0}
        self.by_level = dict.fromkeys(NSFW_LEVELS, 0)
        self.errors: list[dict[str, str]] = []
        self.scanned = self.skipped = 0

    def add(self, row: dict[str, Any], skipped: bool = False) -> None:
        self.status[row["status"]] += 1
        self.skipped += skipped
        self.scanned += not skipped
        if row["status"] == "error":
            self.errors.append({"path": row["path"], "reason": row["reason"]})
            return
        for level, t in self.thresholds.items():
            self.by_level[level] += row[level] >= t


class _Scan:
    """One scan run: decode in workers, score batch by batch, act, report."""

    def __init__(self, args: argparse.Namespace, guard, html, tally: _Tally):
        self.args, self.guard, self.html, self.tally = args, guard, html, tally

    def batch(self, decoded: list[_Decoded]) -> list[dict[str, Any]]:
        """Score the decodable files of ``decoded`` in one filter call; one row per file, in order."""
        good = [d for d in decoded if d.image is not None]
        scored: dict[int, dict[str, Any]] = {}
        if good:
            result = self.guard([d.image for d in good])
            levels = result.scores.levels.float().cpu().tolist() if result.scores is not None else None
            valid = result.scores.valid.cpu().tolist() if result.scores is not None else [False] * len(good)
            for i, d in enumerate(good):
                scored[id(d)] = self._act(d, result.images[i], result.flagged[i], result.reasons[i],
                                          result.actions[i], levels[i] if valid[i] else None)
        rows = [scored[id(d)] if id(d) in scored else self._unreadable(d) for d in decoded]
        for row in rows:
            self.tally.add(row)
        return rows

    def _unreadable(self, d: _Decoded) -> dict[str, Any]:
        row = _row(d.file, status="error", flagged=True, reason=d.error)
        self._quarantine(d.file, row)
        if self.html is not None:
            self.html.add(row, None)
        return row

    def _act(self, d: _Decoded, shown: Image.Image, flagged: bool, reason: str, action: str,
             levels: list[float] | None) -> dict[str, Any]:
        """Write copies / move / overwrite as asked for one scored file; returns its row."""
        args, f = self.args, d.file
        status = "error" if levels is None else ("flagged" if flagged else "ok")
        row = _row(f, width=d.image.width, height=d.image.height, status=status, flagged=flagged,
                   reason=reason, **(dict(zip(LEVELS, levels)) if levels else {}))
        done = []
        try:
            if flagged and args.out is not None:
                target = _reserve(args.out / _censored_name(f.rel))
                try:
                    _save(shown, d.image, target)
                except BaseException:
                    target.unlink()
                    raise
                row["output"] = os.path.abspath(target)
                done.append(action)
            elif not flagged and args.copy_safe:
                target = _reserve(args.out / f.rel)
                shutil.copy2(f.path, target)
                row["output"] = os.path.abspath(target)
                done.append("copy")
            if flagged and args.in_place and status == "flagged":  # a failed check never destroys the file
                self._overwrite(f, shown, d.image)
                row.update(size=f.size, mtime_ns=f.mtime_ns, output=f.path)
                done.append(action)
            if flagged:
                self._quarantine(f, row)
        except Exception as e:  # disk full, a mode the format cannot store...: an error row, not a crash
            row.update(status="error", flagged=True, reason=f"{reason}; error writing output: {e}")
        if row["moved_to"]:
            done.append("move")
        row["action"] = "+".join(done) or "none"
        if self.html is not None:
            self.html.add(row, shown)
        return row

    def _overwrite(self, f: _File, image: Image.Image, original: Image.Image) -> None:
        """Replace the original atomically (a temp file in its folder, then a rename)."""
        src = Path(f.path)
        tmp = _reserve(src.with_name(f".{src.name}.nsfw-safety.tmp{src.suffix}"))
        try:
            _save(image, original, tmp)
            os.replace(tmp, src)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        st = os.stat(src)
        f.size, f.mtime_ns = st.st_size, st.st_mtime_ns

    def _quarantine(self, f: _File, row: dict[str, Any]) -> None:
        if self.args.move_flagged is None or not os.path.lexists(f.path):
            return
        try:
            target = _reserve(self.args.move_flagged / f.rel)
            shutil.move(f.path, target)  # onto our own reserved empty file
            row["moved_to"] = os.path.abspath(target)
        except OSError as e:
            row.update(status="error", flagged=True, reason=f"{row['reason']}; error moving: {e}")


def _scan(args: argparse.Namespace, policy: Policy) -> int:
    out = sys.stderr if args.json else sys.stdout
    exclude = [os.path.realpath(p) for p in (args.out, args.move_flagged) if p is not None]
    files = [_stat(f) for f in _walk(args.paths, exclude)]
    if not files:
        print(f"warning: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {' '.join(args.paths)}",
              file=sys.stderr)

    previous: dict[str, dict[str, Any]] = {}
    try:
        for path in (args.report, args.html):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        if args.report is not None and args.report.exists():
            previous = latest_rows(read_report(args.report))
        report = ReportWriter(args.report) if args.report is not None else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    skipped, todo = [], []
    for f in files:
        old = previous.get(f.path)
        if old is not None and old["status"] != "error" and (old["size"], old["mtime_ns"]) == (f.size, f.mtime_ns):
            skipped.append(old)
        else:
            todo.append(f)

    t0 = time.perf_counter()
    try:
        guard = None
        if todo:
            detector = load_detector(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                                     max_batch_size=args.batch_size)
            censoring = args.out is not None or args.in_place or args.html is not None
            guard = SafetyFilter(detector, policy.level, policy.threshold, thresholds=policy.thresholds,
                                 action=args.action if censoring else "none")
    except (ModelLoadError, ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        if report is not None:
            report.close()
        return EXIT_ERROR
    load_s = time.perf_counter() - t0

    html = HtmlReport(args.html, policy.rules) if args.html is not None else None
    tally = _Tally(policy)
    for row in skipped:
        tally.add(row, skipped=True)
        if html is not None:
            html.add(row, None)
    run = _Scan(args, guard, html, tally)
    interrupted = False
    t1 = time.perf_counter()
    try:
        with _pixel_limit(args.max_pixels):
            _pipeline(run, todo, report, args)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        seconds = time.perf_counter() - t1
        if report is not None:
            report.close()
    if report is not None and not interrupted:
        report.compact()
    summary = _summary(args, policy, len(files), tally, seconds, load_s, interrupted)
    if html is not None:
        html.write(summary)
        html.close()
    _print_summary(summary, args.quiet, out)
    if args.json:
        print(json.dumps(summary, indent=2))
    return summary["exit_code"]


def _pipeline(run: _Scan, todo: list[_File], report, args: argparse.Namespace) -> None:
    """Decode in a thread pool a bounded window ahead of the model, which scores batch by batch."""
    progress = _progress(len(todo), args)
    window = 2 * args.batch_size + args.workers  # decoded images held in memory at most
    pending: deque[Future] = deque()
    todo_iter = iter(todo)
    pool = ThreadPoolExecutor(args.workers, thread_name_prefix="nsfw-safety-decode")
    try:
        def refill() -> None:
            while len(pending) < window:
                f = next(todo_iter, None)
                if f is None:
                    return
                pending.append(pool.submit(_decode, f, args.max_pixels))

        refill()
        while pending:
            decoded: list[_Decoded] = []
            while pending and sum(d.image is not None for d in decoded) < args.batch_size:
                decoded.append(pending.popleft().result())
                refill()
            rows = run.batch(decoded)
            if report is not None:
                report.write(rows)
            if progress is not None:
                progress.update(len(rows))
                progress.set_postfix(flagged=run.tally.status["flagged"], errors=run.tally.status["error"],
                                     refresh=False)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if progress is not None:
            progress.close()


def _progress(total: int, args: argparse.Namespace):
    """A tqdm bar on stderr (images/s and ETA), or None when quiet, not a TTY, or tqdm is missing."""
    if args.quiet or not sys.stderr.isatty() or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        log.info("install tqdm (pip install 'nsfw-safety[cli]') for a progress bar")
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _summary(args, policy: Policy, files: int, tally: _Tally, seconds: float, load_s: float,
             interrupted: bool) -> dict[str, Any]:
    n = tally.status
    if interrupted:
        code = EXIT_INTERRUPTED
    elif n["error"]:
        code = EXIT_ERROR
    elif n["flagged"] and args.fail_on_flagged:
        code = EXIT_FLAGGED
    else:
        code = EXIT_CLEAN
    return {
        "files": files if not interrupted else tally.scanned + tally.skipped,
        "scanned": tally.scanned,
        "skipped": tally.skipped,
        "flagged": n["flagged"],
        "clean": n["ok"],
        "errors": n["error"],
        "by_level": {k: {"threshold": t, "count": tally.by_level[k]} for k, t in tally.thresholds.items()},
        "rules": policy.rules,
        "model": args.model,
        "seconds": round(seconds, 3),
        "model_load_seconds": round(load_s, 3),
        "images_per_second": round(tally.scanned / seconds, 2) if seconds > 0 else 0.0,
        "interrupted": interrupted,
        "report": str(args.report) if args.report is not None else None,
        "html": str(args.html) if args.html is not None else None,
        "error_files": tally.errors,
        "exit_code": code,
    }


def _print_summary(s: dict[str, Any], quiet: bool, out) -> None:
    if s["errors"] or s["interrupted"]:
        for e in s["error_files"][:20]:
            print(f"  {e['path']}: {e['reason']}", file=sys.stderr)
        if s["errors"] > 20:
            print(f"  ... and {s['errors'] - 20} more errors (see the report)", file=sys.stderr)
    if s["interrupted"]:
        print(f"Interrupted after {s['scanned']} files; the report holds them and a re-run resumes.",
              file=sys.stderr)
    if quiet:
        return
    levels = ", ".join(f"{k} >= {v['threshold']:.2f}: {v['count']}" for k, v in s["by_level"].items())
    lines = [
        f"Scanned {s['scanned']} files in {s['seconds']:.1f} s ({s['images_per_second']:.1f} images/s; "
        f"model load {s['model_load_seconds']:.1f} s)"
        + (f"; {s['skipped']} already in the report" if s["skipped"] else ""),
        f"Flagged: {s['flagged']}   Clean: {s['clean']}   Errors: {s['errors']}   ({levels})",
    ]
    if s["report"]:
        lines.append(f"Report: {s['report']}")
    if s["html"]:
        lines.append(f"HTML:   {s['html']}")
    print("\n".join(lines), file=out)


if __name__ == "__main__":
    sys.exit(main())
