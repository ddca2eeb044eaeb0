"""``nsfw-safety scan --engine ray``: the scan on Ray Data, into a folder of Parquet files.

Decode and scoring are :mod:`nsfw_safety.ray`'s (:func:`~nsfw_safety.ray.scan_to_parquet`), so a
re-run with the same ``--out`` skips the files already there, even after a kill. The summary
and the optional ``--report`` are made from all the Parquet rows in the folder, as the local
scan's are from all the rows in its report, so a re-run that skips everything gives the same
exit code.

Animations and videos are checked frame by frame, one row per file, as the local scan checks them
(``frames`` = checked/total, the levels the max over the frames).

Parquet rows keep :data:`nsfw_safety.ray.COLUMNS` (``id`` is the file's absolute path or URL;
``probs`` the class probabilities, ``parts`` each model's own scores with ``--second-opinion``,
``regions`` the regions with ``--regions``, as JSON). A ``--report`` has the local scan's
:data:`~nsfw_safety.scan.reports.COLUMNS`: ``path`` = ``id``; ``mtime_ns``, ``output`` and
``moved_to`` are empty (Ray reads bytes, not file stats; this engine writes no copies and moves
nothing); the settings columns (model, revision, rules, second opinion, region settings) come from
the settings file the folder keeps (:data:`SETTINGS_FILE`). It is rewritten whole on each run (a
file of every row: for what fits on one machine).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..options import REGION_FLAGS
from . import ScanError
from .files import write_atomic
from .reports import COLUMNS, SETTINGS, format_rows, models_text, report_format
from .run import (
    ScanOptions,
    _load_regions,
    _model_arg,
    _second_arg,
    _settings,
    _summary,
    _Tally,
)

#: The settings that scored the folder's rows; a run with other settings is refused.
SETTINGS_FILE = "_nsfw-safety-settings.json"  # "_": Parquet readers skip it
_LEVELS = ("neutral", "low", "medium", "high")


def scan_on_ray(opts: ScanOptions, out: Path, *, address: str | None = None, actors: int | None = None,
                quiet: bool = False) -> dict[str, Any]:
    """Scan ``opts.paths`` on Ray into Parquet files in ``out``; returns the local scan's summary
    (plus ``"parquet"``: the folder). Starts a local Ray unless ``address`` names a cluster."""
    try:
        import pyarrow.parquet as pq
        import ray

        from .. import ray as nray
    except ImportError as e:
        raise ScanError(f"--engine ray needs the ray extra: pip install -e '.[ray]' ({e})") from e
    settings = _settings(opts, resolved=True)
    # a region model that cannot load fails here, in a moment, not in every actor after Ray's start-up
    # (and before the folder records these settings); on the CPU: the driver may have no GPU
    _load_regions(dataclasses.replace(opts, device="cpu"))
    _check_folder(out, settings)
    started = not ray.is_initialized()
    if started:
        # a local Ray without a dashboard, or a connection to a running cluster ("auto", "ray://...")
        ray.init(**({"address": address} if address else {"include_dashboard": False}),
                 log_to_driver=not quiet)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = not quiet
        nray.done_ids(out)  # drops a file torn by a killed run before we list the done ones
        before = set(out.glob("*.parquet"))
        paths = [p if "://" in p else os.path.abspath(p) for p in opts.paths]
        policy = opts.policy
        t0 = time.monotonic()
        try:
            nray.scan_to_parquet(
                nray.read_images(paths), out, model=_model_arg(opts), revision=opts.revision,
                level=policy.level, threshold=policy.threshold, thresholds=policy.thresholds,
                action=opts.action, device=opts.device, dtype=None if opts.dtype == "auto" else opts.dtype,
                batch_size=opts.batch_size, actors=actors, max_pixels=opts.max_pixels,
                second_opinion=opts.second_opinion and _second_arg(opts), band=opts.band, combine=opts.combine,
                **{f.dest: getattr(opts, f.dest) for f in REGION_FLAGS})
        except (FileNotFoundError, OSError, ValueError) as e:  # a source that cannot be listed
            raise ScanError(f"cannot read {' '.join(opts.paths)}: {e}") from e
        seconds = time.monotonic() - t0
    finally:
        if started:
            ray.shutdown()
    tally, rows = _Tally(policy), []
    for path in sorted(out.glob("*.parquet")):
        for r in pq.read_table(path).drop_columns(["probs"]).to_pylist():
            row = _local_row(r, settings)
            tally.add(row, skipped=path in before)
            if opts.report is not None:
                rows.append(row)
    if opts.report is not None:
        fmt = report_format(opts.report)
        text = format_rows(rows, fmt, header=fmt == "csv").encode()
        write_atomic(opts.report, lambda fh: fh.write(text), overwrite=True)
    summary = _summary(opts, settings, tally.scanned + tally.skipped, tally, seconds, 0.0, False)
    summary["parquet"] = str(out)
    return summary


def _check_folder(out: Path, settings: dict[str, str]) -> None:
    """Refuse to mix settings in one folder (resume would skip rows scored by other rules)."""
    path = out / SETTINGS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ScanError(f"cannot read {path}: {e}; remove it only if every row there used these settings") from e
        if old != settings:
            raise ScanError(f"{out} holds rows scored with {old}, not {settings}: use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, indent=2).encode()
    write_atomic(path, lambda fh: fh.write(text), overwrite=True)


def _local_row(r: dict[str, Any], settings: dict[str, str]) -> dict[str, Any]:
    """A Parquet row in the local report's columns (-1 and NaN, Ray's "none", become empty)."""
    row = dict.fromkeys(COLUMNS)
    row.update(path=r["id"], size=r["size"], status=r["status"], flagged=r["flagged"], reason=r["reason"],
               action=r["action"], output="", moved_to="", **{k: settings[k] for k in SETTINGS})
    row["frames"] = r.get("frames") or None  # an animation or video: "checked/total"
    row["parts"] = json.loads(r["parts"]) if r["parts"] else None
    row["models"] = models_text(row["parts"])
    row["regions"] = json.loads(r["regions"]) if r["regions"] else None
    for k in ("width", "height"):
        row[k] = r[k] if r[k] is not None and r[k] >= 0 else None
    for k in _LEVELS:
        row[k] = r[k] if r[k] is not None and not math.isnan(r[k]) else None
    return row
