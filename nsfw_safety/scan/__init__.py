"""The ``nsfw-safety scan`` machinery; ``nsfw_safety.cli`` parses the arguments and prints.

* ``walk``: the files to scan (folders, links, exclusions, temporary files).
* ``run``: one scan: decode in threads, score batch by batch with ``SafetyFilter``, act, report.
* ``outputs``: censored copies, safe copies, in-place overwrites, the quarantine.
* ``reports``: CSV / JSONL rows, their settings, the lock, resuming.
* ``frames_report``: the optional JSONL of every checked frame of animations and videos.
* ``html``: the review page and the thumbnails kept between runs.
* ``files``: the one atomic-write helper, and the temporary files it names.

Importing this package (or ``walk``, ``reports``, ``files``) does not import torch or PIL;
``run``, ``outputs`` and ``html`` do.
"""

#: Images with more pixels than this are refused unread (PIL's own warning limit, ~9459^2).
DEFAULT_MAX_PIXELS = 89_478_485
EXIT_CLEAN, EXIT_FLAGGED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class ScanError(Exception):
    """The scan cannot start or go on (report, lock, settings, model); the message says what to do."""
