"""The video check: a video's frames are a batch for the one scoring path, plus a verdict.

    from nsfw_safety import SafetyFilter, load_detector
    from nsfw_safety.video import check_video, write_censored

    guard = SafetyFilter(load_detector("eva"), level="medium", threshold=0.5, action="blur")
    result = check_video("clip.mp4", guard, window=2)      # or frames: (F, C, H, W), PIL list, ...
    result.flagged, result.reason     # True, "checked 120 of 120 frames; flagged 3: 40-42 (1.67-1.75 s); ..."
    write_censored("clip.mp4", result, "clip.censored.mp4", guard)

Frames are scored by ``guard``'s detector in batches of its ``max_batch_size`` on its device,
flagged by ``guard``'s policy and censored by ``guard``'s censoring: the same resize, threshold
and blur as for still images. A video's verdict is the maximum over its checked frames.

* **Sampling:** every frame by default; ``every=k`` checks one frame in k, ``fps=r`` about r
  frames per second of playing time, ``max_frames=n`` at most n frames spread over the video.
* **Temporal window:** ``window=k`` censors the k frames either side of each flagged frame, so a
  censored region does not flicker in and out. When frames were skipped by sampling, a flagged
  frame also censors the unchecked frames up to the checked frames on either side of it.
* **Censoring:** the flagged frames (and their window), or the whole clip with ``censor="clip"``,
  by ``guard.censor``, the still images' path: in region mode each censored frame is censored in
  the regions found in its own pixels (a frame censored for a flagged neighbour too), and whole
  when none is found or the region detector fails. In-memory frames come back in the same kind,
  layout, dtype and device; files get a censored copy from :func:`nsfw_safety.frames.write_censored`.
* **Fail closed:** a file that cannot be opened raises (nothing was checked); a decoding error
  or a stream that ends early after some frames flags the file, with the reason "checked N of M
  frames, then: <error>", and so does a scoring error (with ``on_error="block"``). Frames with
  non-finite values are flagged and blacked out, as still images are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import inputs as _inputs
from .detector import Scores
from .filter import SafetyFilter
from .frames import VideoError, VideoInfo, VideoLimits, probe, read_frames, write_censored
from .levels import LEVELS, NOT_SCORED, Parts
from .regions.detector import Region

__all__ = ["CENSOR", "VideoBatchResult", "VideoResult", "check_video", "check_videos", "frame_ranges",
           "write_censored"]

CENSOR = ("frames", "clip")
_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class VideoResult:
    """What :func:`check_video` found in one video.

    Attributes:
        frames: the input with censored frames replaced, in the same kind, layout, dtype and
            device (the input itself when nothing was censored); None for a file (use
            :func:`write_censored`).
        flagged: the video is flagged: a frame crossed the line, or the check did not finish.
        reason: e.g. ``"checked 120 of 120 frames; flagged 3: 40-42 (1.67-1.75 s); medium 0.83 >= 0.50"``,
            ``"checked 30 of 300 frames (every 10th frame); none flagged: medium 0.12 < 0.50"`` or
            ``"checked 40 of 120 frames, then: <error>"``.
        total: frames in the video (M).
        checked: indices of the frames scored, ascending.
        scores: their :class:`Scores`, one row per ``checked`` frame (None if none was scored).
        frame_reasons: the policy's reason for each checked frame.
        frame_times: when each checked frame is shown, in seconds (None where unknown).
        flagged_frames: indices of the flagged frames.
        times: when each flagged frame is shown, in seconds (None without timing: in-memory
            frames without ``frame_rate``).
        actions: frame index -> censoring applied, for every censored frame (window included).
        levels: level -> maximum over the checked frames (None if none was scored).
        error: why the check stopped early, or None.
        source: the file's header, for file input.
        over_limit: the :class:`~nsfw_safety.frames.VideoLimits` field (``"pixels"``,
            ``"frames"`` or ``"duration"``) that a file crossed while it was decoded, which
            stopped the check (its header was within the limits, so it lied or gave none); else None.
        failed: indices of the frames whose check failed (non-finite values or scores) or never
            happened (after ``error``): filled with ``color`` whole, never searched for regions.
        regions: region mode, frames in memory (else None): censored frame index -> the regions
            it was censored in, found in its own pixels (empty: censored whole). Files are
            censored, and their regions found, when :func:`write_censored` writes the copy.
        region_reasons: with ``regions``: censored frame index -> what the region search found
            (``"regions: BUTTOCKS_EXPOSED 0.58"``, ``"no region of exposed at or above threshold:
            censored whole"``, ``"region detector failed: ...: censored whole"``), prefixed with
            ``"in the window of a flagged frame; "`` (or ``"in a flagged clip; "``) for a frame
            censored for a neighbour. Failed frames have none.
        masks: with ``regions``: censored frame index -> its region mask (H, W), float32 in
            [0, 1] on the detector's device, for the frames censored in their regions (with
            action ``"none"``: where it would apply); the other censored frames were censored whole.
    """

    frames: Any
    flagged: bool
    reason: str
    total: int
    checked: list[int]
    scores: Scores | None
    frame_reasons: list[str]
    frame_times: list[float | None]
    flagged_frames: list[int]
    times: list[float] | None
    actions: dict[int, str]
    levels: dict[str, float] | None
    error: str | None = None
    source: VideoInfo | None = None
    over_limit: str | None = None
    failed: list[int] = field(default_factory=list)
    regions: dict[int, list[Region]] | None = None
    region_reasons: dict[int, str] | None = None
    masks: dict[int, torch.Tensor] | None = None

    @property
    def censored(self) -> list[int]:
        """Indices of the censored frames, ascending."""
        return sorted(self.actions)

    @property
    def frame_flags(self) -> list[bool]:
        """One bool per frame of the video: flagged by its own score (unchecked frames: False)."""
        hit = set(self.flagged_frames)
        return [i in hit for i in range(self.total)]


@dataclass(frozen=True)
class VideoBatchResult:
    """What :func:`check_videos` found in a batch of videos.

    Attributes:
        frames: the batch with censored frames replaced, same kind, layout, dtype and device.
        videos: one :class:`VideoResult` per video (its ``frames`` is its part of ``frames``).
    """

    frames: Any
    videos: list[VideoResult]

    @property
    def flagged(self) -> list[bool]:
        return [v.flagged for v in self.videos]

    @property
    def reasons(self) -> list[str]:
        return [v.reason for v in self.videos]

    @property
    def any_flagged(self) -> bool:
        return any(self.flagged)


def frame_ranges(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending frame indices as inclusive ranges: ``[3, 4, 5, 9] -> [(3, 5), (9, 9)]``."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _ranges_text(indices: Sequence[int], times: dict[int, float | None], most: int = 8) -> str:
    """``"3-5 (0.12-0.20 s), 9 (0.36 s)"``; past ``most`` ranges, how many more."""
    spans = frame_ranges(indices)
    parts = []
    for a, b in spans[:most]:
        text = str(a) if a == b else f"{a}-{b}"
        if times.get(a) is not None and times.get(b) is not None:
            text += f" ({times[a]:.2f} s)" if a == b else f" ({times[a]:.2f}-{times[b]:.2f} s)"
        parts.append(text)
    if len(spans) > most:
        parts.append(f"... ({len(spans) - most} more ranges)")
    return ", ".join(parts)


# --- sampling --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Sampling:
    every: int | None
    fps: float | None
    max_frames: int | None

    def __post_init__(self) -> None:
        for name in ("every", "max_frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.fps is not None and (isinstance(self.fps, bool) or not self.fps > 0 or not math.isfinite(self.fps)):
            raise ValueError(f"fps must be a number > 0, got {self.fps!r}")
        if self.fps is not None and (self.every is not None or self.max_frames is not None):
            raise ValueError("fps cannot be combined with every or max_frames: pick one way to sample")

    def select(self, total: int, name: str) -> tuple[Callable[[int, float | None], bool], str]:
        """A ``select(index, time)`` for frames visited in order, and how to describe it."""
        if self.fps is not None:
            last = [-1]

            def by_time(index: int, time: float | None) -> bool:
                if time is None:
                    raise ValueError(f"fps= needs frame times: {name} has none (pass frame_rate=)")
                slot = math.floor(time * self.fps + 1e-9)  # the first frame of each 1/fps interval
                if slot > last[0]:
                    last[0] = slot
                    return True
                return False

            return by_time, f"{self.fps:g} per second"
        stride = self.every or 1
        if self.max_frames is not None:
            stride = max(stride, math.ceil(total / self.max_frames))
        text = "" if stride == 1 else f"every {_ordinal(stride)} frame"
        return (lambda index, time: index % stride == 0), text


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# --- the verdict -------------------------------------------------------------------------------

def _verdict(guard: SafetyFilter, total: int, checked: list[int], times: list[float | None],
             parts: list[Scores], error: str | None, sampled: str, window: int, censor: str) -> dict[str, Any]:
    """Flags, reason and censoring of one video from its checked frames' scores."""
    scores = Scores.cat(parts) if parts else None
    head = f"checked {len(checked)} of {total} frames" + (f" ({sampled})" if sampled else "")
    flags: list[bool] = []
    frame_reasons: list[str] = []
    problems: list[str | None] = []
    levels = None
    if scores is not None:
        verdict = guard.policy.decide(scores)  # the one host read
        flags, problems, frame_reasons = verdict.flagged, verdict.problems, verdict.reasons
        top = _top(scores)
        levels = dict(zip(LEVELS, top.levels[0].cpu().tolist()))
    flagged_frames = [i for i, f in zip(checked, flags) if f]
    flagged_times = [t for t, f in zip(times, flags) if f]
    blocked = {i for i, p in zip(checked, problems) if p is not None}
    if error is not None:
        reason = f"{head}, then: {error}"
    elif levels is None:  # nothing scored and no error recorded: impossible, and never "safe"
        raise AssertionError("no frame was scored and no error was recorded")
    else:
        problem = next((r for p, r in zip(problems, frame_reasons) if p is not None), None)  # names the model
        # the rule read on the video's levels (the max over its frames), as for one image
        summary = problem or guard.policy.decide(top).reasons[0]
        if flagged_frames:
            where = _ranges_text(flagged_frames, dict(zip(checked, times)))
            reason = f"{head}; flagged {len(flagged_frames)}: {where}; {summary}"
        else:
            reason = f"{head}; none flagged: {summary}"
    actions: dict[int, str] = {}
    if flagged_frames:
        spread = range(total) if censor == "clip" else _window(total, checked, flags, window)
        actions = {i: "black" if i in blocked else guard.action for i in spread}
    if error is not None:  # the frames after the last one checked are failed checks: filled
        unchecked = range(checked[-1] + 1 if checked else 0, total)
        actions.update({i: "black" for i in unchecked})
        blocked.update(unchecked)
    return dict(flagged=bool(flagged_frames) or error is not None, reason=reason, total=total, checked=checked,
                scores=scores, frame_reasons=frame_reasons, flagged_frames=flagged_frames,
                times=flagged_times if all(t is not None for t in flagged_times) else None,
                actions=actions, levels=levels, error=error, frame_times=list(times), failed=sorted(blocked))


def _top(scores: Scores) -> Scores:
    """One row: each level's maximum over the frames. With a second opinion (``scores.parts``), each
    model's maximum over the frames it scored too, and the model that gave each combined maximum,
    so that the reason names it as it does for one image."""
    top, frame = scores.levels.float().max(0)
    parts = None
    if scores.parts is not None:
        members = []
        for m in scores.parts.scores:
            ran = (m.status != NOT_SCORED)[:, None]
            best = m.levels.float().masked_fill(~ran, -torch.inf).max(0).values
            best = torch.where(ran.any(), best, torch.nan)[None]  # NaN: it scored no frame
            members.append(Scores(best, best, LEVELS, m.status.amax(0, keepdim=True)))
        parts = Parts(scores.parts.names, tuple(members), scores.parts.rule,
                      scores.parts.source.gather(0, frame[None]))
    return Scores(top[None], top[None], LEVELS, torch.zeros(1, dtype=torch.int8, device=top.device), None, parts)


def _window(total: int, checked: list[int], flags: list[bool], window: int) -> list[int]:
    """The frames to censor: each flagged frame, ``window`` frames either side, and the unchecked
    frames between it and the checked frames before and after it."""
    out: set[int] = set()
    for j, (i, hit) in enumerate(zip(checked, flags)):
        if hit:
            lo = min(i - window, checked[j - 1] + 1 if j > 0 else 0)
            hi = max(i + window, checked[j + 1] - 1 if j + 1 < len(checked) else total - 1)
            out.update(range(max(lo, 0), min(hi, total - 1) + 1))
    return sorted(out)


# --- in-memory frames ---------------------------------------------------------------------------

@dataclass
class _Video:
    """One video of the input.

    Attributes:
        n: its frame count.
        frames: the batch (the input, or its censored copy) -> this video's frames, frames first:
            an (F, C, H, W) or (F, H, W, C) view, or a list.
        layout: the layout of a run of its frames for ``prepare`` (None for lists).
    """

    n: int
    frames: Callable[[Any], Any]
    layout: str | None

    def take(self, batch: Any, index: list[int]) -> Any:
        """Frames ``index`` of this video in ``batch``: a view where they are consecutive."""
        frames = self.frames(batch)
        if isinstance(frames, list):
            return [frames[i] for i in index]
        return frames[_at(frames, index)]

    def put(self, out: Any, index: list[int], censored: Any) -> None:
        """Write frames ``index`` of this video into ``out``, the censored copy."""
        frames = self.frames(out)
        if isinstance(frames, list):
            for i, frame in zip(index, censored):
                frames[i] = frame
        else:
            frames[_at(frames, index)] = censored


def _at(frames: Any, index: list[int]) -> Any:
    """A slice (a view, no copy) when the frames are consecutive, else an index array."""
    if index[-1] - index[0] == len(index) - 1:
        return slice(index[0], index[-1] + 1)
    return index if isinstance(frames, np.ndarray) else torch.tensor(index, device=frames.device)


def _array_videos(x: Any, layout: str) -> list[_Video]:
    """The videos of a tensor or numpy array: (F, ...) is one video, (B, ...) a batch."""
    frame_layout = "BHWC" if layout.endswith("HWC") else "BCHW"
    if layout in ("FCHW", "FHWC"):
        return [_Video(x.shape[0], lambda t: t, frame_layout)]
    if layout == "BCFHW":  # a VAE's decoded videos: frame f of video b is x[b, :, f]
        return [_Video(x.shape[2], lambda t, b=b: t[b].swapaxes(0, 1), frame_layout) for b in range(x.shape[0])]
    return [_Video(x.shape[1], lambda t, b=b: t[b], frame_layout) for b in range(x.shape[0])]


def _infer_video_layout(shape: tuple[int, ...], layout: str | None, batched: bool, name: str) -> str:
    allowed = ("BFCHW", "BFHWC", "BCFHW") if batched else ("FCHW", "FHWC")
    if layout is not None:
        if layout not in allowed:
            raise ValueError(f"layout must be one of {allowed}, got {layout!r}")
        return layout
    rank = 5 if batched else 4
    if len(shape) != rank:
        what = "a batch of videos (B, F, C, H, W), (B, F, H, W, C) or (B, C, F, H, W)" if batched else \
            "one video (F, C, H, W) or (F, H, W, C)"
        hint = " (a batch of videos: use check_videos)" if len(shape) == 5 and not batched else ""
        raise ValueError(f"{name} has rank {len(shape)}: expected {what}{hint}")
    if any(s == 0 for s in shape):
        raise ValueError(f"{name} has zero size")
    candidates = {"FCHW": shape[1], "FHWC": shape[-1]} if not batched else \
        {"BFCHW": shape[2], "BFHWC": shape[-1], "BCFHW": shape[1]}
    fits = [lay for lay, c in candidates.items() if c in _CHANNELS]
    if len(fits) != 1:
        raise ValueError(f"{name}: cannot tell the layout from the shape (pass layout= one of {allowed})")
    return fits[0]


def _list_videos(items: list, batched: bool) -> list[_Video]:
    """The videos of a list of frames (PIL images, arrays), or for a batch of a list of such lists."""
    videos = items if batched else [items]
    for b, frames in enumerate(videos):
        if not isinstance(frames, list):
            raise TypeError(f"video {b} is a {type(frames).__name__}: a batch given as a list holds lists of frames")
        if not frames:
            raise ValueError(f"video {b} has no frames")
    if batched:
        return [_Video(len(frames), lambda t, b=b: t[b], None) for b, frames in enumerate(videos)]
    return [_Video(len(items), lambda t: t, None)]


# --- checking ------------------------------------------------------------------------------------

def check_video(video: Any, guard: SafetyFilter, *, every: int | None = None, fps: float | None = None,
                max_frames: int | None = None, window: int = 0, censor: str = "frames",
                frame_rate: float | None = None, value_range: _inputs.ValueRange = (0.0, 1.0),
                layout: str | None = None, limits: VideoLimits = VideoLimits(), decoder: str = "auto",
                device: Any = None) -> VideoResult:
    """Check one video, frame by frame, and censor the flagged frames.

    Args:
        video: one of
            * a file: animated GIF, WebP, APNG (or any multi-frame image Pillow reads), MP4, MOV,
              WebM or MKV; decoded and scored in chunks, so memory does not grow with its length;
            * frames as a tensor or numpy array ``(F, C, H, W)`` or ``(F, H, W, C)``, float in
              ``value_range`` or uint8, C = 1, 3 or 4, on any device (diffusers'
              ``output_type="pt"`` gives ``(B, F, C, H, W)``: pass ``frames[0]``);
            * a list of frames: PIL images (diffusers' ``"pil"`` gives one list per video) or arrays.
        guard: the :class:`SafetyFilter` whose detector, policy and censoring apply.
        every, fps, max_frames: sampling; default every frame (see the module docstring).
            ``fps`` cannot be combined with the others.
        window: also censor this many frames either side of each flagged frame.
        censor: ``"frames"`` (flagged frames and their window) or ``"clip"`` (the whole video
            when any frame is flagged).
        frame_rate: frames per second of in-memory frames, for timestamps and ``fps=``.
        value_range, layout: as for :class:`SafetyFilter`; layout ``"FCHW"`` or ``"FHWC"``.
        limits: what a file may hold (checked from its header before decoding).
        decoder, device: how files are decoded (see :func:`nsfw_safety.frames.read_frames`).
    Returns:
        :class:`VideoResult`.
    Raises:
        VideoError, VideoTooLarge: a file that cannot be checked at all (missing, not a video,
            no video stream, no frames, over a limit from its header).
        TypeError, ValueError: bad frames or arguments (nothing is returned unchecked).
    """
    sampling = _check_options(guard, every, fps, max_frames, window, censor)
    if isinstance(video, (str, os.PathLike)):
        return _check_file(video, guard, sampling, window, censor, limits, decoder, device)
    return _check_memory(video, False, guard, sampling, window, censor, frame_rate, value_range, layout).videos[0]


def check_videos(videos: Any, guard: SafetyFilter, *, every: int | None = None, fps: float | None = None,
                 max_frames: int | None = None, window: int = 0, censor: str = "frames",
                 frame_rate: float | None = None, value_range: _inputs.ValueRange = (0.0, 1.0),
                 layout: str | None = None) -> VideoBatchResult:
    """Check a batch of videos in memory: each gets its own verdict.

    Args:
        videos: a tensor or numpy array ``(B, F, C, H, W)`` (diffusers ``"pt"``), ``(B, F, H, W, C)``
            (diffusers ``"np"``) or ``(B, C, F, H, W)`` (a VAE's decoded video; pass
            ``layout="BCFHW"``, the shape cannot always tell); or a list of lists of frames
            (diffusers ``"pil"``).
        The other arguments are those of :func:`check_video`; ``layout`` is ``"BFCHW"``,
        ``"BFHWC"`` or ``"BCFHW"``.
    Returns:
        :class:`VideoBatchResult`: the censored batch in the input's kind, and one
        :class:`VideoResult` per video.
    """
    sampling = _check_options(guard, every, fps, max_frames, window, censor)
    return _check_memory(videos, True, guard, sampling, window, censor, frame_rate, value_range, layout)


def _check_memory(videos: Any, batched: bool, guard: SafetyFilter, sampling: _Sampling, window: int, censor: str,
                  frame_rate: float | None, value_range, layout: str | None) -> VideoBatchResult:
    if frame_rate is not None and not (frame_rate > 0 and math.isfinite(frame_rate)):
        raise ValueError(f"frame_rate must be a number > 0, got {frame_rate!r}")
    value_range = _inputs.check_range(value_range)
    if isinstance(videos, (torch.Tensor, np.ndarray)):
        name = f"{'numpy array' if isinstance(videos, np.ndarray) else 'tensor'} of shape {tuple(videos.shape)}"
        parts = _array_videos(videos, _infer_video_layout(tuple(videos.shape), layout, batched, name))
    elif isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("no videos" if batched else "no frames")
        if batched and not isinstance(videos[0], list):
            raise TypeError(f"a batch given as a list holds lists of frames, got a list of "
                            f"{type(videos[0]).__name__} (one video: use check_video)")
        parts = _list_videos(list(videos), batched)
    else:
        raise TypeError(f"frames must be a tensor, numpy array or list, got {type(videos).__name__}"
                        + (" (a file: use check_video)" if isinstance(videos, (str, os.PathLike)) else ""))
    found = [_check_frames(videos, v, guard, sampling, window, censor, frame_rate, value_range) for v in parts]
    out = _censored_copy(videos, parts, found, guard, value_range, censor)
    results = [VideoResult(frames=out[b] if batched else out, **fields) for b, fields in enumerate(found)]
    return VideoBatchResult(out, results)


def _check_options(guard, every, fps, max_frames, window, censor) -> _Sampling:
    if guard.detector is None:
        raise TypeError("a video is checked by a SafetyFilter with a classifier (region-only mode, "
                        "detector=None, checks still images only)")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an integer >= 0, got {window!r}")
    if censor not in CENSOR:
        raise ValueError(f"censor must be one of {CENSOR}, got {censor!r}")
    return _Sampling(every, fps, max_frames)


def _score_chunks(guard: SafetyFilter, chunks, parts: list[Scores], done: list[int]) -> str | None:
    """Score ``(index, batch, layout, value_range)`` chunks into ``parts``; the scored indices go
    to ``done``. Bad input raises; a scoring error stops the check and is returned as its reason
    (``on_error="block"``) or raised (``on_error="raise"``)."""
    for index, batch, layout, value_range in chunks:
        prepared = _inputs.prepare(batch, layout=layout, value_range=value_range, device=guard.detector.device)
        try:
            parts.append(guard.detector.score(prepared.pixels, prepared.finite))
        except Exception as e:
            if guard.on_error == "raise":
                raise
            return f"error: {type(e).__name__}: {e}"
        done.extend(index)
    return None


def _check_frames(videos: Any, video: _Video, guard: SafetyFilter, sampling: _Sampling, window: int, censor: str,
                  frame_rate: float | None, value_range) -> dict[str, Any]:
    """The verdict on one video in memory (its fields of :class:`VideoResult`, less ``frames``)."""
    select, sampled = sampling.select(video.n, "the frames")
    times = [i / frame_rate if frame_rate else None for i in range(video.n)]
    chosen = [i for i in range(video.n) if select(i, times[i])]
    size = guard.detector.max_batch_size

    def chunks():
        for start in range(0, len(chosen), size):
            index = chosen[start : start + size]
            yield index, video.take(videos, index), video.layout, value_range

    parts: list[Scores] = []
    checked: list[int] = []
    error = _score_chunks(guard, chunks(), parts, checked)
    return _verdict(guard, video.n, checked, [times[i] for i in checked], parts, error, sampled, window, censor)


def _censored_copy(videos: Any, parts: list[_Video], found: list[dict], guard: SafetyFilter, value_range,
                   censor: str) -> Any:
    """The input with every censored frame replaced, censored in chunks by ``guard.censor``; the
    input itself when nothing is censored. In region mode, each video's ``found`` gets the regions
    of its censored frames, their masks, and its reason a summary of them."""
    if guard.regions is not None:
        for fields in found:
            fields.update(regions={}, region_reasons={}, masks={})
    if not any(f["actions"] for f in found):
        return videos
    if isinstance(videos, torch.Tensor):
        out = videos.clone()
    elif isinstance(videos, np.ndarray):
        out = videos.copy()
    else:
        out = [list(v) for v in videos] if isinstance(videos[0], list) else list(videos)
    size = guard.detector.max_batch_size
    for video, fields in zip(parts, found):
        actions, failed, flagged = fields["actions"], set(fields["failed"]), set(fields["flagged_frames"])
        index = sorted(actions)
        for start in range(0, len(index), size):
            chunk = index[start : start + size]
            prepared = _inputs.prepare(video.take(videos, chunk), layout=video.layout, value_range=value_range,
                                       device=guard.detector.device)
            done = guard.censor(prepared, [actions[i] for i in chunk],
                                search=[k for k, i in enumerate(chunk) if i not in failed])
            video.put(out, chunk, done.images)
            if fields.get("regions") is not None:
                for i, row, note in zip(chunk, done.regions, done.notes):
                    if note:
                        neighbour = "" if i in flagged else \
                            "in the window of a flagged frame; " if censor == "frames" else "in a flagged clip; "
                        fields["regions"][i], fields["region_reasons"][i] = row, neighbour + note
                fields["masks"].update((chunk[k], m) for k, m in done.masks.items())
        if fields.get("regions"):
            fields["reason"] += _regions_text(fields["regions"], fields["region_reasons"])
    return out


def _regions_text(regions: dict[int, list[Region]], reasons: dict[int, str]) -> str:
    """``"; 2 of 3 frames censored in their regions; frame 42: no region of ...: censored whole"``."""
    whole = [i for i in sorted(regions) if not regions[i]]
    text = f"; {len(regions) - len(whole)} of {len(regions)} frames censored in their regions"
    if whole:
        more = f" (+{len(whole) - 1} more whole)" if len(whole) > 1 else ""
        text += f"; frame {whole[0]}: {reasons[whole[0]]}{more}"
    return text


# --- files ------------------------------------------------------------------------------------------

def _check_file(path, guard: SafetyFilter, sampling: _Sampling, window: int, censor: str, limits: VideoLimits,
                decoder: str, device: Any) -> VideoResult:
    info = probe(path, limits)  # raises: nothing checked, nothing to flag
    select, sampled = sampling.select(info.frames, repr(str(path)))
    frames = read_frames(path, limits=limits, select=select, decoder=decoder, device=device, info=info)
    size = guard.detector.max_batch_size
    decode_error: list[VideoError] = []
    seen = [0]
    times: dict[int, float | None] = {}

    def chunks():
        buffer = []
        try:
            for frame in frames:
                seen[0] = frame.index + 1
                if frame.image is not None:
                    buffer.append(frame)
                    times[frame.index] = frame.time
                if len(buffer) == size:
                    yield _batch(buffer)
                    buffer = []
        except VideoError as e:
            decode_error.append(e)
        finally:
            frames.close()
        if buffer:  # frames decoded before an error are still checked
            yield _batch(buffer)

    parts: list[Scores] = []
    checked: list[int] = []
    score_error = _score_chunks(guard, chunks(), parts, checked)
    error = score_error or (str(decode_error[0]) if decode_error else None)
    over_limit = getattr(decode_error[0], "limit", None) if decode_error and not score_error else None
    total = max(info.frames, seen[0])  # a file may hold more frames than its header says
    fields = _verdict(guard, total, checked, [times[i] for i in checked], parts, error, sampled, window, censor)
    return VideoResult(frames=None, source=info, over_limit=over_limit, **fields)


def _batch(frames: list) -> tuple[list[int], Any, str | None, _inputs.ValueRange]:
    """Decoded frames as one batch for ``prepare``: uint8 arrays stacked when sizes agree."""
    index = [f.index for f in frames]
    images = [f.image for f in frames]
    first = images[0]
    if isinstance(first, np.ndarray) and all(im.shape == first.shape for im in images):
        return index, np.stack(images), "BHWC", (0.0, 1.0)
    if isinstance(first, torch.Tensor) and all(im.shape == first.shape for im in images):
        return index, torch.stack(images), "BCHW", (0.0, 1.0)
    return index, images, "HWC" if isinstance(first, np.ndarray) else None, (0.0, 1.0)
