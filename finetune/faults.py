"""Test-only fault hooks: a worker that dies, freezes or hangs at a named point, so the reliability tests
can put a real worker process exactly where a crash would hurt (tests/test_jobs_reliability.py).

Inert unless the environment variable `T2I_TEST_WORKER_HOOK` is set; no setting, flag or API reaches it.
Its value is `POINT:ACTION`, comma-separated for several; each fires at most once per process.
POINT: `dequeued` (rq handed the job over, not yet claimed), `claimed` (the lease is taken), `step-N` (step
N done), `checkpoint-N` (about to write the checkpoint of step N: after the ownership check). ACTION:
`kill` (SIGKILL itself), `stop` (SIGSTOP itself; SIGCONT resumes it) or `hang` (block this thread forever).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

_fired: set[str] = set()


def _hooks() -> dict[str, str]:
    spec = os.environ.get("T2I_TEST_WORKER_HOOK", "")
    return dict(item.split(":", 1) for item in spec.split(",") if ":" in item)


def hook(point: str) -> None:
    """Do what `T2I_TEST_WORKER_HOOK` asks at `point`, once; nothing when it is unset."""
    if "T2I_TEST_WORKER_HOOK" not in os.environ or point in _fired:
        return
    action = _hooks().get(point)
    if action is None:
        return
    _fired.add(point)
    log.warning("test hook: %s at %s", action, point)
    for h in logging.getLogger().handlers:  # the test reads the log to know the worker got there
        h.flush()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "hang":
        threading.Event().wait()
