"""Freed memory kept for the next request (glibc's malloc; elsewhere nothing happens).

Why: a raw-tensor request of 16 images of 512x512 is a 12 MB body. By default glibc gives blocks that
large back to the kernel when they are freed (mmap'ed blocks, and a trimmed heap), so every request
page-faults its buffers in again: measured on the 2-core VM of docs/benchmarks.md, 7 ms of a 12 MB body's
join, more than the copy itself. Raising glibc's mmap and trim thresholds keeps up to `mb` megabytes of
freed memory in the process for the next request: receiving the body then costs a copy, not a fault per
page. The price is resident memory: after a peak the process stays up to `mb` above what it uses.

Threads share one arena (glibc's `M_ARENA_MAX` = 1). Why: every other arena lives in heaps of at most
64 MB, and a preprocessing thread's working set for one part of a request (a float copy of 8 images of
512x512 is 25 MB, plus the outputs) spills into fresh heaps that glibc hands back when they empty; the
preprocessing pool then faulted in ~6,000 pages per 16-image request (24 MB); with one arena 500-1,300, and
40-180 once raw tensors were prepared one image at a time (docs/benchmarks.md). Every malloc then takes that arena's lock; with a few threads, as on the 2-core VM,
that cost did not show, and it was not measured on a many-core host.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses an mmap threshold above this on some versions


def keep_freed_memory(mb: int) -> bool:
    """Keep up to `mb` MB of freed memory in this process (0: glibc's defaults). True when applied."""
    if mb <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc; musl has no libc.so.6 / mallopt
    except (OSError, AttributeError):
        log.info("keep_freed_mb: not glibc, left as it is")
        return False
    size = mb << 20
    trimmed = mallopt(M_TRIM_THRESHOLD, size) == 1
    mapped = mallopt(M_MMAP_THRESHOLD, size) == 1 or mallopt(M_MMAP_THRESHOLD, min(size, MMAP_THRESHOLD_MAX)) == 1
    one_arena = mallopt(M_ARENA_MAX, 1) == 1
    return trimmed and mapped and one_arena
