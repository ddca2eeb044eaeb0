"""A warm interpreter that forks ``nsfw-safety`` runs on request.

Tests SIGKILL real scan processes many times, run two at once, and run them as another user.
Importing torch for each one would take seconds, so this process imports everything once
(and never runs a model, so forking is safe) and forks a child per run.

Protocol, one JSON object per line:

* ``{"argv": [...], "stdout": PATH, "stderr": PATH, "uid": N, "gid": N, "slow": S}`` starts
  ``nsfw_safety.cli.main(argv)`` in a child (output to the files; as user ``uid``; with
  ``slow``, every link, unlink, rename and fsync first sleeps S seconds, so that a kill lands
  between the steps of a move) and answers ``{"pid": N}``;
* ``{"wait": N}`` reaps child N and answers ``{"pid": N, "code": C}`` (``-9`` when killed).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import PIL.Image  # noqa: F401  (imported once, before any fork)
import timm  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

from nsfw_safety import cli
from nsfw_safety.scan import run  # noqa: F401  (everything a scan imports)


def _slow(seconds: float) -> None:
    for name in ("link", "unlink", "rename", "replace", "fsync"):
        real = getattr(os, name)

        def slowed(*args, _real=real, **kwargs):
            time.sleep(seconds)
            return _real(*args, **kwargs)

        setattr(os, name, slowed)


def _child(req: dict) -> int:
    for fd, key in ((1, "stdout"), (2, "stderr")):
        out = os.open(req.get(key) or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.dup2(out, fd)
        os.close(out)
    if req.get("gid") is not None:
        os.setgroups([])
        os.setgid(req["gid"])
    if req.get("uid") is not None:
        os.setuid(req["uid"])
    if req.get("slow"):
        _slow(req["slow"])
    return cli.main(req["argv"])


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        if "wait" in req:
            _, status = os.waitpid(req["wait"], 0)
            print(json.dumps({"pid": req["wait"], "code": os.waitstatus_to_exitcode(status)}), flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                code = _child(req)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    main()
