"""service/memory.py: freed request buffers stay in the process for the next request (glibc), counted in
page faults, in fresh interpreters (the allocator setting is process-wide)."""

import subprocess
import sys

import pytest
from t2i_reward.service.memory import keep_freed_memory
from t2i_reward.service.settings import Settings

# five requests of a 12 MB body (16 uint8 images of 512x512): 48 chunks of 256 KB arrive (as the server reads
# them) and are joined (as Starlette does), then all is freed; prints the page faults of the five
SCRIPT = """
import resource, sys
from t2i_reward.service.memory import keep_freed_memory
print(keep_freed_memory(int(sys.argv[1])), file=sys.stderr)

def request():
    chunks = [bytes(256 * 1024) for _ in range(48)]
    body = b"".join(chunks)
    del chunks, body

request()  # the first request grows the heap either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    request()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mb: int) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(mb)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_bodies_are_reused_instead_of_faulted_in_again():
    kept, default = faults(256), faults(0)
    pages = 5 * 12 * 1024 * 1024 // 4096
    assert default > pages, default  # glibc's defaults: each request faults its chunks and its body in again
    assert kept < pages // 5, kept  # kept: the freed memory is reused


def test_zero_leaves_the_allocator_alone():
    assert keep_freed_memory(0) is False
    assert Settings().keep_freed_mb == 256
    with pytest.raises(ValueError):
        Settings(keep_freed_mb=-1)
