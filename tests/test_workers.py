"""compare's and frontier's worker processes end with their parent: a parent killed by SIGTERM (a scheduler,
`kill`) or SIGKILL leaves no worker training on, writing a run folder nobody waits for."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")

PARENT = '''
import os, sys, time
from forgetless.workers import worker_pool

def work(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(120)  # a long training run

if __name__ == "__main__":
    pool = worker_pool(1)
    pool.submit(work, sys.argv[1])
    time.sleep(120)
'''


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whatever adopted it, maybe never in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_worker_exits_when_its_parent_is_killed(tmp_path, sig):
    script, pid_file = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        assert wait_for(pid_file.exists, 60), "the worker never started"
        worker = int(pid_file.read_text())
        time.sleep(2)
        assert running(worker), "the worker left while its parent was alive"
        os.kill(parent.pid, sig)
        parent.wait(10)
        assert wait_for(lambda: not running(worker), 10), "the worker outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if pid_file.exists() and running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
