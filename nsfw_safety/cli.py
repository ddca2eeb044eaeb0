"""The ``nsfw-safety`` command line: arguments and printing.

* ``nsfw-safety scan PATH...``: score every image under the given files and folders, write
  a report, and optionally censored copies, a quarantine, or an HTML page for review
  (the work is done by ``nsfw_safety.scan``).
* ``nsfw-safety serve``: the HTTP server (``nsfw_safety.server``, needs the ``server`` extra).

Exit codes of ``scan``: 0 all clean, 1 some flagged (``--no-fail-on-flagged`` turns this
into 0), 2 errors (unreadable files, outputs or report not written, bad arguments, a model
that cannot load), 130 interrupted.

Parsing imports neither torch nor PIL: ``--help``, ``--version`` and argument errors answer
at once; the model libraries load when a scan starts. This is the only module that prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .options import REGION_FLAGS, SECOND_OPINION_FLAGS, check_regions, check_second_opinion
from .scan import DEFAULT_MAX_PIXELS, EXIT_ERROR, EXIT_INTERRUPTED, ScanError
from .scan.reports import FORMATS
from .scan.walk import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .vocabulary import (ACTIONS, BANDLESS, DEFAULT_ACTION, DEFAULT_LEVEL, DEFAULT_MODEL, DEFAULT_THRESHOLD,
                         MIN_SCORE, NSFW_LEVELS, SHAPES, check_threshold, level_index)

#: How many flagged files and errors the text summary prints (the report has them all).
PRINTED = 20
_CENSOR_ACTIONS = tuple(a for a in ACTIONS if a != "none")


# --- arguments -------------------------------------------------------------------------------

def _thresholds(text: str) -> dict[str, float]:
    """``"low=0.9,medium=0.6"`` -> ``{"low": 0.9, "medium": 0.6}``, each checked."""
    out = {}
    for part in text.split(","):
        level, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[level.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LEVEL=THRESHOLD[,LEVEL=THRESHOLD...], got {text!r}") from None
    try:
        for level, t in out.items():
            level_index(level)
            check_threshold(t, f"{level} threshold")
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return out


def _threshold(text: str) -> float:
    try:
        return check_threshold(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``nsfw-safety`` parser and its ``scan`` subparser."""
    parser = argparse.ArgumentParser(
        prog="nsfw-safety", description="Score images with an NSFW classifier; blur or block what crosses the line.")
    parser.add_argument("--version", action="version", version=f"nsfw-safety {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser(
        "scan", help="scan files and folders of images, write a report and censored copies",
        description=f"Scan images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}) and videos "
                    f"({', '.join(e.lstrip('.') for e in VIDEO_EXTENSIONS)}) in files and folders (recursively); "
                    "every frame of an animation or video is checked. Exit codes: 0 all clean, 1 some flagged, "
                    "2 errors, 130 interrupted.")
    scan.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders to scan")
    g = scan.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name, hub id, or local checkpoint folder (default: %(default)s)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of the model")
    g.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 or auto (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="images per model call (default: 16)")
    g.add_argument("--workers", type=_positive_int, default=min(8, os.cpu_count() or 1),
                   help="parallel image decoders (default: min(8, CPU count))")
    g = scan.add_argument_group("policy")
    g.add_argument("--level", choices=NSFW_LEVELS,
                   help=f"flag when this level's score >= --threshold (default: {DEFAULT_LEVEL})")
    g.add_argument("--threshold", type=_threshold, help=f"threshold in [0, 1] for --level (default: {DEFAULT_THRESHOLD})")
    g.add_argument("--thresholds", type=_thresholds, metavar="LEVEL=T,...",
                   help="per-level thresholds instead, e.g. low=0.9,medium=0.6: flagged when any level meets its own")
    g.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels than this, unread (default: {DEFAULT_MAX_PIXELS:,})")
    g = scan.add_argument_group("second opinion (--revision is the first model's: the second loads at its default "
                                "revision, or from a folder; see README)")
    for f in SECOND_OPINION_FLAGS:
        g.add_argument(f.name, dest=f.dest, help=f.help, **f.kwargs)
    g = scan.add_argument_group("output")
    g.add_argument("--report", type=Path, help=f"report file ({', '.join(FORMATS)}); appended to, and re-runs "
                                               "skip files already in it with the same size and mtime")
    g.add_argument("--frames-report", type=Path, metavar="PATH.jsonl",
                   help="also write one JSON line per checked frame of each animation or video (path, size, "
                        "mtime_ns, frame, time, the level scores, flagged, reason); still images get none. "
                        "Resumed with --report; without it, each run starts the file afresh")
    g.add_argument("--html", type=Path, help="write a self-contained HTML page for review")
    g.add_argument("--json", action="store_true", help="print a JSON summary on stdout (the text summary goes to stderr)")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but errors: no progress bar, warnings or text summary")
    g.add_argument("--no-fail-on-flagged", dest="fail_on_flagged", action="store_false",
                   help="exit 0 instead of 1 when images are flagged (errors still exit 2)")
    g = scan.add_argument_group("actions (originals are never modified unless --in-place is given)")
    g.add_argument("--action", choices=_CENSOR_ACTIONS, default=DEFAULT_ACTION,
                   help="how flagged images are censored in --out copies, --in-place, and the HTML "
                        "(default: %(default)s)")
    g.add_argument("--out", type=Path, metavar="DIR", help="write censored copies of flagged images here, mirroring the tree")
    g.add_argument("--copy-safe", action="store_true", help="with --out: also copy the unflagged images there")
    g.add_argument("--move-flagged", type=Path, metavar="DIR",
                   help="move flagged originals (and files that could not be checked) here, mirroring the tree")
    g.add_argument("--in-place", action="store_true",
                   help="overwrite flagged originals with their censored version (mode and owner kept)")
    g.add_argument("--force", action="store_true", help="with --in-place: overwrite read-only files too")

    g = scan.add_argument_group("engine (ray: pip install -e '.[ray]'; see README, At scale: Ray)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data, writing Parquet files to --out DIR, "
                        "resumable (no --html, --copy-safe, --move-flagged or --in-place)")
    g.add_argument("--address", help="with --engine ray: a running cluster (auto, ray://HOST:10001); "
                                     "default: start a local Ray")
    g.add_argument("--actors", type=_positive_int,
                   help="with --engine ray: scoring actors (default: one per GPU, else one per 4 CPUs)")

    g = scan.add_argument_group(
        "regions (pip install -e '.[regions]'; NudeNet's model: AGPL-3.0; see README, Region censoring)",
        f"defaults: --region-threshold {MIN_SCORE}, --region-expand 0, --region-shape {SHAPES[0]}, "
        "--region-feather 0")
    for f in REGION_FLAGS:
        g.add_argument(f.name, dest=f.dest, help=f.help, **f.kwargs)

    sub.add_parser("serve", add_help=False, help="run the HTTP server (needs the server extra: "
                                                 "pip install -e '.[server]'); see nsfw-safety serve --help")
    return parser, scan


def _looks_like_a_path(model: str) -> bool:
    """``./m``, ``../m``, ``/m``, ``~/m``, ``C:\\m``: a folder, never a hub id (``owner/name``)."""
    return (model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
            or (len(model) > 1 and model[1] == ":"))


def _check_scan_args(scan: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot check; errors show the ``scan`` usage and exit 2."""
    if args.thresholds is not None and (args.level is not None or args.threshold is not None):
        scan.error("give either --level/--threshold or --thresholds, not both")
    if args.engine == "ray":
        if args.out is None:
            scan.error("--engine ray needs --out DIR (its Parquet files)")
        given = [f"--{n.replace('_', '-')}" for n in ("html", "copy_safe", "move_flagged", "in_place", "force",
                                                      "frames_report")
                 if getattr(args, n)]
        if given:
            scan.error(f"{', '.join(given)} not available with --engine ray")
    elif args.address is not None or args.actors is not None:
        scan.error("--address and --actors need --engine ray")
    if args.copy_safe and args.out is None:
        scan.error("--copy-safe needs --out DIR")
    if args.in_place and (args.out is not None or args.move_flagged is not None):
        scan.error("--in-place cannot be combined with --out or --move-flagged")
    if args.force and not args.in_place:
        scan.error("--force only applies to --in-place")
    if args.out is not None and args.move_flagged is not None and \
            os.path.realpath(args.out) == os.path.realpath(args.move_flagged):
        scan.error("--out and --move-flagged must be different folders")
    for name in ("out", "move_flagged"):
        folder = getattr(args, name)
        if folder is None:
            continue
        for path in args.paths:
            if os.path.isdir(path) and os.path.realpath(path) == os.path.realpath(folder):
                scan.error(f"--{name.replace('_', '-')} {str(folder)!r} is the scanned folder {path!r}: its "
                           f"outputs would be scanned again; use another folder (one inside it is skipped)")
    for name in ("report", "html", "frames_report"):
        path = getattr(args, name)
        if path is not None and path.is_dir():
            scan.error(f"--{name.replace('_', '-')} {str(path)!r} is a folder: expected a file")
    if args.frames_report is not None:
        if FORMATS.get(args.frames_report.suffix.lower()) != "jsonl":
            scan.error(f"--frames-report {str(args.frames_report)!r} must end in .jsonl or .ndjson")
        if any(p is not None and os.path.realpath(p) == os.path.realpath(args.frames_report)
               for p in (args.report, args.html)):
            scan.error("--frames-report must be a file of its own, not the --report or --html file")
    if args.report is not None and args.report.suffix.lower() not in FORMATS:
        scan.error(f"--report {str(args.report)!r} must end in one of {', '.join(FORMATS)}")
    _check_region_args(scan, args)
    model = os.path.expanduser(args.model)
    if _looks_like_a_path(args.model) and not os.path.isdir(model):
        scan.error(f"--model {args.model!r}: no such directory"
                   + (" (it is a file: give the checkpoint's folder)" if os.path.isfile(model) else ""))
    args.model = model if os.path.isdir(model) else args.model
    _check_second_opinion(scan, args)


def _check_second_opinion(scan: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--second-opinion, --band and --combine: together, and with the policy."""
    if args.second_opinion is None:
        if args.band is not None or args.combine is not None:
            scan.error("--band and --combine need --second-opinion MODEL")
        return
    try:
        check_second_opinion(args.second_opinion, args.band, args.combine)
    except ValueError as e:
        scan.error(f"bad second opinion: {e}")
    if args.thresholds is not None and args.combine not in BANDLESS:
        scan.error(f"--thresholds with --second-opinion needs --combine {' or '.join(BANDLESS)} (both models on "
                   f"every image): a cascade's --band is read on one level, so give --level and --threshold")
    second = os.path.expanduser(args.second_opinion)
    if _looks_like_a_path(args.second_opinion) and not os.path.isdir(second):
        scan.error(f"--second-opinion {args.second_opinion!r}: no such directory"
                   + (" (it is a file: give the checkpoint's folder)" if os.path.isfile(second) else ""))
    args.second_opinion = second if os.path.isdir(second) else args.second_opinion


def _check_region_args(scan: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Region mode's flags (``options.REGION_FLAGS``): checked, and the unset ones given their defaults."""
    given = [f.name for f in REGION_FLAGS if f.dest != "regions" and getattr(args, f.dest) is not None]
    if args.regions is None:
        if given:
            scan.error(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --regions")
        return
    for dest, default in (("region_threshold", MIN_SCORE), ("region_expand", 0.0), ("region_shape", SHAPES[0]),
                          ("region_feather", 0.0)):
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    try:
        check_regions(args.regions, args.region_model, args.region_threshold, args.region_expand,
                      args.region_shape, args.region_feather)
    except ValueError as e:
        message = str(e)
        for f in REGION_FLAGS:  # the check names settings (region_feather); here they are flags
            if f.dest != "regions":
                message = message.replace(f.dest, f.name)
        scan.error(message)
    if args.region_model is not None:
        path = os.path.expanduser(args.region_model)
        if not os.path.isfile(path):
            scan.error(f"--region-model {args.region_model!r}: no such file")
        args.region_model = os.path.abspath(path)  # as the report records it, wherever a resume runs


# --- main --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser, scan_parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command != "serve" and extra:
            (scan_parser if args.command == "scan" else parser).error(f"unrecognized arguments: {' '.join(extra)}")
        quiet = args.command == "scan" and args.quiet
        logging.basicConfig(level=logging.ERROR if quiet else logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if args.command == "serve":
            return _serve(extra)
        _check_scan_args(scan_parser, args)
    except SystemExit as e:  # argparse: --help, --version (0) and usage errors (2)
        return int(e.code or 0)
    try:
        return _scan(args)
    except KeyboardInterrupt:  # before scanning started (e.g. while the model loads)
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _serve(argv: list[str]) -> int:
    from . import serve_settings  # the flags and their checks: neither torch nor fastapi yet

    parser = argparse.ArgumentParser(prog="nsfw-safety serve", description="Run the nsfw-safety HTTP server.")
    serve_settings.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve_settings.from_args(args)
    except (TypeError, ValueError) as e:
        print(f"nsfw-safety serve: bad server settings: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        from . import server  # lazy: fastapi and uvicorn are an optional extra
    except ImportError as e:
        print(f"nsfw-safety serve is not available: {e}\n"
              f"Install the server extra from the clone: pip install -e '.[server]'", file=sys.stderr)
        return EXIT_ERROR
    return int(server.run(args) or 0)


def _scan(args: argparse.Namespace) -> int:
    import warnings

    if args.quiet:
        warnings.simplefilter("ignore")  # library warnings are not errors
    from .levels import Policy  # the model libraries load from here on
    from .scan.run import ScanOptions, scan

    policy = Policy(**{k: v for k, v in (("level", args.level), ("threshold", args.threshold),
                                         ("thresholds", args.thresholds)) if v is not None})
    opts = ScanOptions(
        paths=args.paths, model=args.model, revision=args.revision, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, workers=args.workers, policy=policy, max_pixels=args.max_pixels,
        report=args.report, html=args.html, fail_on_flagged=args.fail_on_flagged, action=args.action,
        out=args.out, copy_safe=args.copy_safe, move_flagged=args.move_flagged, in_place=args.in_place,
        force=args.force, second_opinion=args.second_opinion, band=args.band, combine=args.combine,
        frames_report=args.frames_report,
        **{f.dest: getattr(args, f.dest) for f in REGION_FLAGS if getattr(args, f.dest) is not None})
    try:
        if args.engine == "ray":
            from .scan.on_ray import scan_on_ray  # imports ray

            opts = dataclasses.replace(opts, out=None)  # --out is the Parquet folder here, not censored copies
            summary = scan_on_ray(opts, args.out, address=args.address, actors=args.actors, quiet=args.quiet)
        else:
            summary = scan(opts, progress=None if args.quiet else _progress)
    except ScanError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if summary["files"] == 0 and not args.quiet:
        print(f"warning: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {' '.join(args.paths)}",
              file=sys.stderr)
    _print_summary(summary, args.quiet, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary, indent=2))
    return summary["exit_code"]


def _progress(total: int):
    """A tqdm bar on stderr (images/s and ETA), or None when not a TTY or tqdm is missing."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        logging.getLogger(__name__).info("install tqdm (pip install -e '.[cli]') for a progress bar")
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _print_summary(s: dict[str, Any], quiet: bool, out) -> None:
    """Errors always (stderr); the rest, flagged files included, unless quiet."""
    for e in s["error_files"][:PRINTED]:
        print(f"  {e['path']}: {e['reason']}", file=sys.stderr)
    if s["errors"] > PRINTED:
        print(f"  ... and {s['errors'] - PRINTED} more errors (see the report)", file=sys.stderr)
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
    for f in s["flagged_files"][:PRINTED]:
        lines.append(f"  flagged: {f['path']} ({f['reason']}" + (f"; -> {f['to']})" if "to" in f else ")"))
    if s["flagged"] > PRINTED:
        lines.append(f"  ... and {s['flagged'] - PRINTED} more flagged (see the report)")
    if s["report"]:
        lines.append(f"Report: {s['report']}")
    if s.get("parquet"):
        lines.append(f"Parquet: {s['parquet']}")
    if s["html"]:
        lines.append(f"HTML:   {s['html']}")
    print("\n".join(lines), file=out)


if __name__ == "__main__":
    sys.exit(main())
