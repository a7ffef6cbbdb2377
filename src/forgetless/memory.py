"""Peak memory of a block of work: accelerator memory on a GPU, sampled resident set size on a CPU."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(result: dict):
    """Fills result["peak_bytes"] (highest use inside the block) and result["delta_bytes"] (above the start).

    CPU: a thread samples RSS every millisecond (RSS also counts what the allocator keeps cached).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        try:
            yield result
        finally:
            torch.cuda.synchronize()
            result["peak_bytes"] = torch.cuda.max_memory_allocated()
            result["delta_bytes"] = result["peak_bytes"] - start
        return
    start = current_rss()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak_bytes"] = peak[0]
        result["delta_bytes"] = peak[0] - start
