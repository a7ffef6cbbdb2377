"""The CPU allocator settings `forgetless train` applies: freed tensors stay in the heap for reuse."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
import torch
from forgetless.memory import keep_freed_cpu_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_cpu_memory() if sys.argv[1] == "apply" else False
x = torch.ones(16 * 2**20)  # 64 MiB: far above glibc's mmap threshold
mmapped = libc.mallinfo2().hblkhd
free_before = libc.mallinfo2().fordblks
del x
kept = libc.mallinfo2().fordblks - free_before  # freed bytes the heap holds on to for reuse
print(applied, mmapped >= 64 * 2**20, kept >= 64 * 2**20)
"""


def run_probe(mode: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "FORGETLESS_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return out.stdout.split()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings are Linux-only")
def test_freed_tensors_stay_in_the_heap_after_keep_freed_cpu_memory():
    # glibc's default: a 64 MiB tensor is its own mmap (unmapped on free, page-faulted in again next step)
    assert run_probe("default") == ["False", "True", "False"]
    # applied: it comes from the heap, which keeps it after the free for the next step's tensors
    assert run_probe("apply") == ["True", "False", "True"]
    # the user's own malloc settings win, and FORGETLESS_MALLOC=system opts out
    assert run_probe("apply", MALLOC_MMAP_THRESHOLD_="65536") == ["False", "True", "False"]
    assert run_probe("apply", FORGETLESS_MALLOC="system") == ["False", "True", "False"]
