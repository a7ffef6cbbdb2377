"""Worker processes for `compare --jobs` and `frontier --jobs`: spawned, logging as the parent does, and
gone with the parent.

A worker trains for many minutes. Were the parent killed (SIGTERM from a scheduler, SIGKILL, a closed
terminal), the pool's workers would be reparented and train on to the end of their current run, writing
a run folder nobody waits for; a rerun of the same comparison would then train the same folder in a second
process beside it. So each worker watches its parent (multiprocessing's parent sentinel, ready once the
parent has exited) and exits the moment it is gone. What it had trained
since its last checkpoint is lost, as in any kill; the rerun resumes from that checkpoint.

Standard library only: a spawned worker imports this module before anything else."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from concurrent.futures import ProcessPoolExecutor

from forgetless import console

# the exit status of a worker whose parent is gone (128 + SIGTERM, as if it had been terminated)
ORPHAN_EXIT = 143


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """A pool of `jobs` spawned worker processes that log as this process does and exit when it dies."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=parent_logging())


def parent_logging() -> tuple[int, str | None, bool | None]:
    """What a spawned worker needs to log as this process does: the root logger's level, its first handler's
    format (None: this process configured no logging, and the workers configure none either) and how it
    quieted third-party noise (forgetless.console.quieted)."""
    root = logging.getLogger()
    fmt = root.handlers[0].formatter._fmt if root.handlers and root.handlers[0].formatter else None
    return root.level, fmt, console.quieted()


def _start_worker(level: int, fmt: str | None, quieted: bool | None = None) -> None:
    """A worker's initializer: log lines reach the console as the parent's do (only when the parent
    configured logging: the CLI does; a library caller's choice is theirs), third-party noise quieted as the
    parent quieted it, and exit once the parent is gone."""
    if fmt is not None:
        logging.basicConfig(level=level, format=fmt)
    if quieted is not None:
        console.quiet_third_party_noise(quantized=quieted)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), name="forgetless-parent-watch",
                         daemon=True).start()


def _exit_with_parent(sentinel: int) -> None:
    # the parent's sentinel becomes ready when the parent exits, however it ends (every platform; no polling).
    # os._exit, not sys.exit: the main thread is inside a training step and would not see an exception
    # raised in this thread
    multiprocessing.connection.wait([sentinel])
    os._exit(ORPHAN_EXIT)
