"""One scan run: find the files, decode them in threads, score them batch by batch with
``SafetyFilter``, act on the flagged ones, and write the report and the review page.

Order of work in a run, each step relying on the previous one:

1. lock the report (one writer), check it is ours and was scored with these settings;
2. settle the moves that a killed run announced but may not have finished;
3. walk the roots; files whose row still holds (same path, size and mtime) are skipped;
4. per batch: score, write copies / overwrite in place, write the rows (the row of a file
   to move names its target *before* the move), then move;
5. compact the report, prune old thumbnails, write the HTML page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from PIL import Image

from ..cascade import second_opinion
from ..detector import load_detector
from ..filter import SafetyFilter
from ..frames import VideoLimits, censor_decoded, read_frames
from ..frames import write_censored as write_censored_video
from ..inputs import MultiFrameImage, open_image
from ..levels import LEVELS, NSFW_LEVELS, Policy
from ..models import ModelLoadError, resolve
from ..options import REGION_FLAGS
from ..vocabulary import BANDLESS, DEFAULT_ACTION, DEFAULT_MODEL, MIN_SCORE, SHAPES
from . import DEFAULT_MAX_PIXELS, EXIT_CLEAN, EXIT_ERROR, EXIT_FLAGGED, EXIT_INTERRUPTED, ScanError
from . import outputs
from .files import remove_stale_temps
from .frames_report import FramesReport, frame_lines
from .html import HtmlReport, ThumbStore
from .reports import (COLUMNS, SECOND_OPINION, SETTINGS, ReportLock, ReportWriter, check_settings, encode_path,
                      frames_parts, latest_rows, models_text, read_report)
from .walk import VIDEO_EXTENSIONS, Found, walk

#: How many flagged files and errors the summary lists (all are in the report).
LISTED = 1000


@dataclass(frozen=True)
class ScanOptions:
    """What ``nsfw-safety scan`` was asked to do (see its ``--help``)."""

    paths: Sequence[str]
    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 16
    workers: int = 4
    policy: Policy = field(default_factory=Policy)
    max_pixels: int = DEFAULT_MAX_PIXELS
    report: Path | None = None
    html: Path | None = None
    fail_on_flagged: bool = True
    action: str = DEFAULT_ACTION
    out: Path | None = None
    copy_safe: bool = False
    move_flagged: Path | None = None
    in_place: bool = False
    force: bool = False
    #: a second model that re-checks the images whose first score at the policy's level is in
    #: ``band`` (None: threshold to 1), combined by ``combine`` (None: override); see ``cascade.second_opinion``
    second_opinion: str | None = None
    band: tuple[float, float] | None = None
    combine: str | None = None
    # region mode (off when regions is None): as RegionSettings' classes, detector (an .onnx
    # path; None: the nudenet package's), threshold, expand, shape and feather
    regions: str | tuple[str, ...] | None = None
    region_model: str | None = None
    region_threshold: float | Mapping[str, float] = MIN_SCORE
    region_expand: float | Mapping[str, float] = 0.0
    region_shape: str = SHAPES[0]
    region_feather: float = 0.0
    frames_report: Path | None = None


def rules_text(policy: Policy) -> str:
    """The policy as ``--thresholds`` would give it, e.g. ``"low=0.9,high=0.8"``."""
    return ",".join(f"{level}={t!r}" for level, t in policy.rules.items())


def regions_text(opts: ScanOptions) -> str:
    """Region mode as the flags that give it (``""`` when off), e.g. ``"--regions exposed
    --region-threshold 0.25 --region-expand 0.0 --region-shape rectangle --region-feather 0.0"``:
    the settings record of a report's rows."""
    if opts.regions is None:
        return ""
    flag = {f.dest: f.name for f in REGION_FLAGS}

    def text(value: Any) -> str:
        if isinstance(value, Mapping):
            return ",".join(f"{k}={float(v)!r}" for k, v in sorted(value.items()))
        return value if isinstance(value, str) else repr(float(value))

    classes = opts.regions if isinstance(opts.regions, str) else ",".join(opts.regions)
    values = {"regions": classes, "region_model": opts.region_model and os.path.abspath(opts.region_model),
              "region_threshold": text(opts.region_threshold), "region_expand": text(opts.region_expand),
              "region_shape": opts.region_shape, "region_feather": text(opts.region_feather)}
    return shlex.join(part for dest, value in values.items() if value is not None for part in (flag[dest], value))


def _load_regions(opts: ScanOptions) -> Any:
    """Region mode's :class:`~nsfw_safety.regions.RegionSettings` (the region model loaded on
    ``--device``), or None when it is off.

    Raises:
        ScanError: the region model cannot be loaded (nudenet or onnxruntime missing, a file that
            is not a NudeNet detector) or does not have the classes asked for; the message names it.
    """
    if opts.regions is None:
        return None
    name = opts.region_model or "nudenet/320n.onnx (the nudenet package's)"
    try:
        from ..regions import RegionDetector, RegionSettings

        return RegionSettings(RegionDetector(opts.region_model, device=opts.device), opts.regions,
                              opts.region_threshold, opts.region_expand, opts.region_shape, opts.region_feather)
    except Exception as e:  # ImportError, FileNotFoundError, onnxruntime's own errors...: exit 2, named
        raise ScanError(f"cannot load the region model {name}: {type(e).__name__}: {e}") from e


@dataclass
class _Decoded:
    file: Found
    image: Image.Image | None
    error: str | None
    video: bool = False  # an animation or a video: checked frame by frame by check_video


def _decode(f: Found, max_pixels: int) -> _Decoded:
    """Runs in a worker thread: open and decode one file (EXIF orientation); animations and
    videos are only recognised here, and decoded frame by frame when they are scored."""
    if f.error is not None:
        return _Decoded(f, None, f.error)
    try:
        if f.size == 0:
            raise ValueError("empty file (0 bytes)")
        if os.path.splitext(f.path)[1].lower() in VIDEO_EXTENSIONS:
            return _Decoded(f, None, None, video=True)
        try:
            return _Decoded(f, open_image(f.path, max_pixels), None)
        except MultiFrameImage:
            return _Decoded(f, None, None, video=True)
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


class _Tally:
    """Running counts for the summary (rows themselves are not kept: folders can be huge)."""

    def __init__(self, policy: Policy):
        rules = policy.rules
        default = policy.threshold if policy.thresholds is None else 0.5
        self.thresholds = {level: rules.get(level, default) for level in NSFW_LEVELS}
        self.status = {"ok": 0, "flagged": 0, "error": 0}
        self.by_level = dict.fromkeys(NSFW_LEVELS, 0)
        self.errors: list[dict[str, str]] = []
        self.flagged: list[dict[str, str]] = []
        self.scanned = self.skipped = 0

    def add(self, row: dict[str, Any], skipped: bool = False) -> None:
        self.status[row["status"]] += 1
        self.skipped += skipped
        self.scanned += not skipped
        listed = {"error": self.errors, "flagged": self.flagged}.get(row["status"])
        if listed is not None and len(listed) < LISTED:
            entry = {"path": encode_path(row["path"]), "reason": row["reason"]}
            if row["moved_to"] or row["output"]:
                entry["to"] = encode_path(row["moved_to"] or row["output"])
            listed.append(entry)
        if row["status"] != "error":
            for level, t in self.thresholds.items():
                self.by_level[level] += row[level] >= t


class _Batches:
    """Scores decoded files batch by batch and acts on them; owns the rows' order on disk."""

    def __init__(self, opts: ScanOptions, guard: SafetyFilter | None, report: ReportWriter | None,
                 html: HtmlReport | None, tally: _Tally, settings: dict[str, str], frames: FramesReport | None = None):
        self.opts, self.guard, self.report, self.html, self.tally = opts, guard, report, html, tally
        self.settings = settings
        self.frames = frames
        self.claimed: set[str] = set()  # quarantine names announced but not yet taken

    def __call__(self, decoded: list[_Decoded]) -> None:
        good = [d for d in decoded if d.image is not None]
        shown: dict[int, Image.Image] = {}  # id(Found) -> what the page shows
        rows: list[dict[str, Any]] = []
        if good:
            result = self.guard([d.image for d in good])
            levels = result.scores.levels.float().cpu().tolist() if result.scores is not None else None
            valid = result.scores.valid.cpu().tolist() if result.scores is not None else [False] * len(good)
            found = ([[r.to_dict() for r in regions] for regions in result.regions] if result.regions is not None
                     else [None] * len(good))
            parts = _parts(result.scores, len(good))
            for i, d in enumerate(good):
                shown[id(d.file)] = result.images[i]
                rows.append(self._act(d, result.images[i], result.flagged[i], result.reasons[i],
                                      result.actions[i], levels[i] if valid[i] else None, found[i]))
                rows[-1].update(parts=parts[i], models=models_text(parts[i]))
        for d in decoded:
            if d.video:
                row, poster = self._video(d.file)
                rows.append(row)
                shown[id(d.file)] = poster
            elif d.image is None:
                rows.append(self._row(d.file, status="error", flagged=True, reason=d.error))
        moves = [row for row in rows if self._plan_move(row)]
        self._write(rows)  # the rows of moved files name their target before anything moves
        fixed = [row for row in moves if not self._move(row)]
        self._write(fixed)
        for row in rows:
            self.tally.add(row)
            if self.html is not None:
                self.html.add(row, shown.get(id(row["_file"])))

    def _row(self, f: Found, **values: Any) -> dict[str, Any]:
        row = dict.fromkeys(COLUMNS)
        row.update(path=f.path, size=f.size, mtime_ns=f.mtime_ns, reason="", action="none", output="",
                   moved_to="", **self.settings)
        row.update(values)
        row["_file"] = f  # not a column: what the row is about
        return row

    def _act(self, d: _Decoded, shown: Image.Image, flagged: bool, reason: str, action: str,
             levels: list[float] | None, regions: list[dict[str, Any]] | None) -> dict[str, Any]:
        """Write the copy or overwrite the original, as asked, for one scored file; its row."""
        opts, f = self.opts, d.file
        status = "error" if levels is None else ("flagged" if flagged else "ok")
        row = self._row(f, width=d.image.width, height=d.image.height, status=status, flagged=flagged,
                        reason=reason, regions=regions, **(dict(zip(LEVELS, levels)) if levels else {}))
        done = []
        try:
            if flagged and opts.out is not None:
                row["output"] = str(outputs.write_censored(shown, d.image, opts.out / outputs.censored_name(f.rel)))
                done.append(action)
            elif not flagged and opts.copy_safe:
                row["output"] = str(outputs.copy_file(f.path, opts.out / f.rel))
                done.append("copy")
            if flagged and opts.in_place and status == "flagged":  # a failed check never destroys the file
                st = outputs.overwrite(f.path, shown, d.image, opts.force)
                row.update(size=st.st_size, mtime_ns=st.st_mtime_ns, output=f.path)
                done.append(action)
        except outputs.OutputError as e:
            row.update(status="error", flagged=True, reason=f"{reason}; error: {e.strerror}", _stays=True)
        except Exception as e:  # disk full, a mode the format cannot store...: an error row, not a crash
            row.update(status="error", flagged=True, reason=f"{reason}; error writing output: {e}", _stays=True)
        row["action"] = "+".join(done) or "none"
        return row

    def _video(self, f: Found) -> tuple[dict[str, Any], Image.Image | None]:
        """Check an animation or a video, every frame, with ``check_video``; write its censored
        copy as asked. Its row (``frames`` = checked/total, the levels = the max over its frames)
        and its poster for the page: a censored flagged frame, or the first frame of a clean file."""
        from ..video import check_video  # lazy: PyAV and the video module only when a video is found

        opts = self.opts
        try:
            result = check_video(f.path, self.guard, limits=VideoLimits(max_pixels=opts.max_pixels))
        except Exception as e:  # not checked at all: an error row with the reason
            msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            return self._row(f, status="error", flagged=True, reason="error: " + _without_path(msg, f.path)), None
        if self.frames is not None:  # before the batch's rows: a row always follows its file's lines
            self._write_frames(frame_lines(f.path, f.size, f.mtime_ns, result))
        failed = result.error is not None or result.levels is None
        # the first flagged frame, censored as the copy censors it: the poster, and the row's regions
        first = first_flagged(f.path, result, self.guard) if result.flagged and not failed and (
            self.html is not None or self.guard.regions is not None) else None
        row = self._row(f, **video_values(result, self.guard, first))
        done = []
        try:
            if result.flagged and not failed and opts.out is not None:
                target = outputs.free_name(opts.out / f.rel, set())
                target.parent.mkdir(parents=True, exist_ok=True)
                row["output"] = str(write_censored_video(f.path, result, target, self.guard))
                done.append(self.guard.action)
            elif not result.flagged and opts.copy_safe:
                row["output"] = str(outputs.copy_file(f.path, opts.out / f.rel))
                done.append("copy")
            if result.flagged and opts.in_place and not failed:
                row["reason"] += "; not overwritten: --in-place rewrites still images only"
        except Exception as e:  # disk full, a format that cannot be written...: an error row, not a crash
            row.update(status="error", flagged=True, reason=f"{row['reason']}; error writing output: {e}",
                       _stays=True)
        row["action"] = "+".join(done) or "none"
        poster = self._poster(f, result, first) if self.html is not None and row["status"] != "error" else None
        return row, poster

    def _poster(self, f: Found, result: Any, first: Any) -> Image.Image | None:
        """The frame the page shows: ``first``, the first flagged frame censored (None when the
        action censors nothing: an uncensored flagged frame is never shown), or the first frame."""
        if result.flagged:
            if first is None or result.actions.get(result.flagged_frames[0], "none") == "none":
                return None
            image = first.images[0]
        else:
            try:
                image = read_frame(f.path, result, 0)
            except Exception:  # the row stands; the page shows no thumbnail
                return None
        return image if isinstance(image, Image.Image) else Image.fromarray(image)

    def _plan_move(self, row: dict[str, Any]) -> bool:
        """Name the quarantine target of a flagged or unreadable file in its row."""
        f: Found = row["_file"]
        if (self.opts.move_flagged is None or not row["flagged"] or not f.movable or row.get("_stays")
                or not os.path.lexists(f.path)):
            return False  # (an output failed: the original stays where it is)
        target = outputs.free_name(self.opts.move_flagged / f.rel, self.claimed)
        self.claimed.add(str(target))
        row["moved_to"] = str(target)
        row["action"] = "move" if row["action"] == "none" else row["action"] + "+move"
        return True

    def _move(self, row: dict[str, Any]) -> bool:
        """Move one announced file; False when the row had to change (its fix is to be written)."""
        target = Path(row["moved_to"])
        self.claimed.discard(str(target))
        while True:
            try:
                outputs.move(row["path"], target)
                return True
            except FileExistsError:  # taken since it was announced: announce another name first
                target = outputs.free_name(self.opts.move_flagged / row["_file"].rel, self.claimed)
                row["moved_to"] = str(target)
                self._write([row])
            except OSError as e:
                actions = [a for a in row["action"].split("+") if a not in ("move", "none")]
                row.update(status="error", flagged=True, moved_to="", action="+".join(actions) or "none",
                           reason=f"{row['reason']}; error moving: {e}")
                return False

    def _write_frames(self, lines: Iterable[dict[str, Any]]) -> None:
        try:
            self.frames.write(lines)
        except OSError as e:
            raise ScanError(f"cannot write the frames report {str(self.frames.path)!r}: {e.strerror or e}") from e

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self.report is None or not rows:
            return
        try:
            self.report.write(rows)
        except OSError as e:
            raise ScanError(f"cannot write the report {str(self.report.path)!r}: {e.strerror or e}") from e


def video_values(result: Any, guard: SafetyFilter, first: Any) -> dict[str, Any]:
    """The row values of an animation or video checked by ``check_video`` (``result``), as every
    engine writes them: frame size, ``frames`` = checked/total, status, the levels = the max over its
    frames, the reason; in region mode the regions of the first flagged frame (``first``, from
    :func:`first_flagged`, None when it was not read back); with a second opinion each model's max.
    """
    info = result.source
    failed = result.error is not None or result.levels is None  # "checked N of M frames, then: ..."
    row = dict(width=info.width, height=info.height, frames=f"{len(result.checked)}/{result.total}",
               status="error" if failed else ("flagged" if result.flagged else "ok"),
               flagged=result.flagged, reason=result.reason, **(result.levels or {}))
    if guard.regions is not None:
        row["regions"] = [r.to_dict() for r in first.regions[0]] if first is not None else []
        if first is not None and first.notes[0]:
            row["reason"] += f"; first flagged frame {result.flagged_frames[0]}: {first.notes[0]}"
        elif first is None and result.flagged and not failed:
            row["reason"] += f"; frame {result.flagged_frames[0]} could not be read back for its regions"
    if result.scores is not None and result.scores.parts is not None:  # each model's max over its frames
        row["parts"] = frames_parts(result.scores.parts.to_dicts())
        row["models"] = models_text(row["parts"])
    return row


def first_flagged(path: str, result: Any, guard: SafetyFilter) -> Any:
    """The first flagged frame of the file ``result`` checked, censored by ``guard`` as the
    censored copy censors it (in region mode: in its own regions, unless its check failed): a
    ``Censored`` of one image, or None when the frame cannot be read back."""
    index = result.flagged_frames[0]
    try:
        image = read_frame(path, result, index)
        search = [0] if index not in result.failed else []
        return censor_decoded([image], [result.actions.get(index, "none")], guard, search=search)
    except Exception:  # the row stands, without the frame's regions or a thumbnail
        return None


def read_frame(path: str, result: Any, index: int) -> Any:
    """Frame ``index`` of the file ``result`` checked, decoded again."""
    frames = read_frames(path, select=lambda i, t: i == index, info=result.source)
    try:
        return next(fr.image for fr in frames if fr.index == index)
    finally:
        frames.close()


def _pipeline(batches: _Batches, todo: list[Found], opts: ScanOptions, progress) -> None:
    """Decode in a thread pool a bounded window ahead of the model, which scores batch by batch."""
    window = 2 * opts.batch_size + opts.workers  # decoded images held in memory at most
    pending: deque[Future] = deque()
    todo_iter = iter(todo)
    pool = ThreadPoolExecutor(opts.workers, thread_name_prefix="nsfw-safety-decode")
    try:
        def refill() -> None:
            while len(pending) < window:
                f = next(todo_iter, None)
                if f is None:
                    return
                pending.append(pool.submit(_decode, f, opts.max_pixels))

        refill()
        while pending:
            decoded: list[_Decoded] = []
            while pending and sum(d.image is not None for d in decoded) < opts.batch_size:
                decoded.append(pending.popleft().result())
                refill()
            batches(decoded)
            if progress is not None:
                progress.update(len(decoded))
                progress.set_postfix(flagged=batches.tally.status["flagged"], errors=batches.tally.status["error"],
                                     refresh=False)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if progress is not None:
            progress.close()


def _model_arg(opts: ScanOptions) -> str:
    """``--model``, with a checkpoint folder made absolute (so a resume from elsewhere matches)."""
    return os.path.abspath(opts.model) if os.path.isdir(opts.model) else opts.model


def _parts(scores: Any, n: int) -> list[list[dict[str, Any]] | None]:
    """Per image of ``n``, each model's own scores (``Parts.to_dicts``), or None (one model, or a
    batch whose scoring failed: its rows carry the error)."""
    if scores is None or scores.parts is None:
        return [None] * n
    return scores.parts.to_dicts()


def _settings(opts: ScanOptions, resolved: bool) -> dict[str, str]:
    """model id (as the library resolves it), revision, rules, second opinion, region mode: what a report
    row records."""
    model = _model_arg(opts)
    if resolved:
        try:
            _, model, _ = resolve(model, revision=opts.revision)
        except (ModelLoadError, ValueError, TypeError, OSError) as e:
            raise ScanError(f"cannot load model {opts.model!r}: {e}") from e
    settings = dict(zip(SETTINGS, (model, opts.revision or "", rules_text(opts.policy))))
    settings.update(_second_opinion_settings(opts, resolved))
    settings["region_settings"] = regions_text(opts)
    return settings


def _second_arg(opts: ScanOptions) -> str:
    """``--second-opinion``, with a checkpoint folder made absolute (as ``--model``)."""
    return os.path.abspath(opts.second_opinion) if os.path.isdir(opts.second_opinion) else opts.second_opinion


def _second_opinion_settings(opts: ScanOptions, resolved: bool) -> dict[str, str]:
    """The second opinion's settings columns (empty without one): its model id, resolved as
    ``--model``'s, the band it takes effect in (``--threshold`` to 1 unless ``--band``; none for
    ``any``/``all``) and the rule, so that the defaults and the same values spelled out match."""
    if opts.second_opinion is None:
        return dict.fromkeys(SECOND_OPINION, "")
    second = _second_arg(opts)
    if resolved:
        try:
            _, second, _ = resolve(second)
        except (ModelLoadError, ValueError, TypeError, OSError) as e:
            raise ScanError(f"cannot load the second opinion model {opts.second_opinion!r}: {e}") from e
    combine = opts.combine or "override"
    band = opts.band if opts.band is not None else (opts.policy.threshold, 1.0)
    return dict(zip(SECOND_OPINION, (second, "" if combine in BANDLESS else ",".join(repr(float(b)) for b in band),
                                     combine)))


def _load(opts: ScanOptions) -> Any:
    """The detector: ``--model``, and the second opinion's cascade or ensemble around it."""
    try:
        detector = load_detector(_model_arg(opts), revision=opts.revision, device=opts.device,
                                 dtype=opts.dtype, max_batch_size=opts.batch_size)
    except (ModelLoadError, ValueError, TypeError, OSError, RuntimeError) as e:
        raise ScanError(f"cannot load model {opts.model!r}: {e}") from e
    if opts.second_opinion is None:
        return detector
    try:  # at its default revision (--revision is the first model's), on the first's device
        return second_opinion(detector, _second_arg(opts), band=None if opts.band is None else tuple(opts.band),
                              level=opts.policy.level, threshold=opts.policy.threshold,
                              combine=opts.combine or "override", dtype=opts.dtype, max_batch_size=opts.batch_size)
    except (ModelLoadError, ValueError, TypeError, OSError, RuntimeError) as e:
        raise ScanError(f"cannot load the second opinion model {opts.second_opinion!r}: {e}") from e


def load_filter(opts: ScanOptions, action: str) -> SafetyFilter:
    """The scan's ``SafetyFilter``, as both engines build it (``--engine ray`` in each actor): region
    mode's settings first (they fail in a moment where the classifier takes seconds), then the
    detector with its second opinion, the policy, and ``action``.

    Raises:
        ScanError: a model that cannot load; the message names it.
    """
    regions = _load_regions(opts)
    detector = _load(opts)
    try:
        return SafetyFilter(detector, opts.policy.level, opts.policy.threshold, thresholds=opts.policy.thresholds,
                            action=action, regions=regions)
    except (ModelLoadError, ValueError, TypeError, OSError, RuntimeError) as e:
        raise ScanError(f"cannot load model {opts.model!r}: {e}") from e


def _clean_outputs(opts: ScanOptions) -> None:
    """Delete temporary files that killed runs left in the output folders."""
    for top in (opts.out, opts.move_flagged):
        if top is not None and top.is_dir():
            for folder, _, names in os.walk(top):
                remove_stale_temps(folder, names)


def scan(opts: ScanOptions, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run one scan; returns the summary (see the README), whose ``exit_code`` is the answer.

    Args:
        opts: what to do.
        progress: ``progress(total)`` returns a tqdm-like bar (``update``, ``set_postfix``,
            ``close``) or None.
    Raises:
        ScanError: the scan could not run or had to stop (nothing misreported); the message
            says what to do. KeyboardInterrupt is turned into an interrupted summary.
    """
    opts = dataclasses.replace(opts, **{k: Path(os.path.abspath(getattr(opts, k))) for k in ("out", "move_flagged")
                                        if getattr(opts, k) is not None})  # rows name absolute paths
    report_path = Path(opts.report) if opts.report is not None else None
    thumbs = ThumbStore(f"{report_path}.thumbs") if report_path is not None else None
    exclude = [p for p in (opts.out, opts.move_flagged, thumbs and thumbs.folder) if p is not None]
    lock = writer = html = frames = None
    try:
        if report_path is not None:
            try:
                report_path.parent.mkdir(parents=True, exist_ok=True)
                lock = ReportLock(report_path)
                remove_stale_temps(report_path.parent)
                remove_stale_temps(thumbs.folder)
                writer = ReportWriter(report_path)
                previous = latest_rows(read_report(report_path))
            except OSError as e:
                raise ScanError(f"cannot use the report {str(report_path)!r}: {e.strerror or e}") from e
        else:
            previous = {}
        _clean_outputs(opts)
        settings = None
        if previous:
            settings = _settings(opts, resolved=True)
            check_settings(previous.values(), settings, report_path)
            for path, row in list(previous.items()):  # moves announced by a killed run, before the walk
                if row["moved_to"] and not outputs.recover_move(row):
                    del previous[path]  # the move did not happen: the file is scanned again
        files = list(walk([str(p) for p in opts.paths], [str(p) for p in exclude]))
        settings = settings or _settings(opts, resolved=bool(files))
        if opts.frames_report is not None:
            try:
                frames = FramesReport(opts.frames_report)
            except (OSError, ValueError) as e:
                raise ScanError(f"cannot use the frames report {str(opts.frames_report)!r}: {e}") from e

        skipped, todo = [], []
        for f in files:
            old = previous.get(f.path)
            if (old is not None and old["status"] != "error" and not old["moved_to"]
                    and (old["size"], old["mtime_ns"]) == (f.size, f.mtime_ns)
                    and (frames is None or frames.complete(old))):  # a file lacking frame lines is redone
                skipped.append(old)
            else:
                todo.append(f)
        if frames is not None:
            redo = {f.path for f in todo}
            try:  # the lines of files scored again, or never recorded in the report, go
                frames.start(lambda key: key[0] not in redo and key[0] in previous
                             and (previous[key[0]]["size"], previous[key[0]]["mtime_ns"]) == key[1:])
            except OSError as e:
                raise ScanError(f"cannot write the frames report {str(opts.frames_report)!r}: {e.strerror or e}") from e

        t0 = time.perf_counter()
        guard = None
        if any(f.error is None for f in todo):
            censoring = opts.out is not None or opts.in_place or opts.html is not None
            guard = load_filter(opts, opts.action if censoring else "none")
        load_s = time.perf_counter() - t0

        html = HtmlReport(opts.html, opts.policy.rules, thumbs) if opts.html is not None else None
        tally = _Tally(opts.policy)
        for row in skipped:
            tally.add(row, skipped=True)
            if html is not None:
                html.add(row, None)
        batches = _Batches(opts, guard, writer, html, tally, settings, frames)
        interrupted = False
        t1 = time.perf_counter()
        try:
            with _pixel_limit(opts.max_pixels):
                _pipeline(batches, todo, opts, progress(len(todo)) if progress is not None and todo else None)
        except KeyboardInterrupt:
            interrupted = True
        seconds = time.perf_counter() - t1
        if html is not None:  # the page reviews the whole report
            walked = {f.path for f in files}
            for path, row in previous.items():
                if path not in walked:
                    html.add(row, None, earlier=True)
        if writer is not None:
            writer.close()
            if not interrupted:
                try:
                    kept = writer.compact()
                    if thumbs is not None:
                        thumbs.prune(kept)
                except OSError as e:
                    raise ScanError(f"cannot write the report {str(report_path)!r}: {e.strerror or e}") from e
        summary = _summary(opts, settings, len(files), tally, seconds, load_s, interrupted)
        if html is not None:
            try:
                html.write(summary)
            except OSError as e:
                raise ScanError(f"cannot write the HTML page {str(opts.html)!r}: {e.strerror or e}") from e
        return summary
    finally:
        if html is not None:
            html.close()
        if writer is not None:
            writer.close()
        if frames is not None:
            frames.close()
        if lock is not None:
            lock.release()


def _summary(opts: ScanOptions, settings: dict[str, str], files: int, tally: _Tally, seconds: float,
             load_s: float, interrupted: bool) -> dict[str, Any]:
    n = tally.status
    if interrupted:
        code = EXIT_INTERRUPTED
    elif n["error"]:
        code = EXIT_ERROR
    elif n["flagged"] and opts.fail_on_flagged:
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
        "rules": opts.policy.rules,
        "model": settings["model"],
        "revision": settings["revision"] or None,
        "regions": settings["region_settings"] or None,
        "second_opinion": {"model": settings["second_opinion"], "combine": settings["combine"],
                           "band": [float(b) for b in settings["band"].split(",")] if settings["band"] else None}
        if settings["second_opinion"] else None,
        "seconds": round(seconds, 3),
        "model_load_seconds": round(load_s, 3),
        "images_per_second": round(tally.scanned / seconds, 2) if seconds > 0 else 0.0,
        "interrupted": interrupted,
        "report": str(opts.report) if opts.report is not None else None,
        "html": str(opts.html) if opts.html is not None else None,
        "flagged_files": tally.flagged,
        "error_files": tally.errors,
        "exit_code": code,
    }
