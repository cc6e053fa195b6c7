"""fsbuild/lock.py: the refusal names the process that really holds the lock."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsbuild import lock
from fsbuild.errors import LockHeldError

# Takes the lock, hands its open file to a child that outlives it (a fork, as a careless
# helper would), then exits: the pid written in the file is dead, the lock is still held.
HANDOFF = """
import os, sys, time
from fsbuild import lock
with lock.hold(__import__("pathlib").Path(sys.argv[1]), "x"):
    if os.fork() == 0:
        print(os.getpid(), flush=True)
        time.sleep(60)
        os._exit(0)
"""


def test_refusal_names_the_live_holder_not_the_recorded_pid(tmp_path: Path) -> None:
    lockfile = tmp_path / "ws.lock"
    parent = subprocess.Popen([sys.executable, "-c", HANDOFF, str(lockfile)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = parent.stdout.readline().strip()
    parent.wait(30)
    try:
        recorded = lockfile.read_text().strip()
        assert recorded == str(parent.pid) and child != recorded
        with pytest.raises(LockHeldError) as exc, lock.hold(lockfile, "workspace t1"):
            pass
        msg = exc.value.message
        assert f"pid {child} (" in msg and recorded not in msg and msg.startswith("workspace t1 is locked"), msg
    finally:
        subprocess.run(["kill", child], check=False)
    deadline = time.monotonic() + 30
    while True:   # the child's exit releases it
        try:
            with lock.hold(lockfile, "workspace t1"):
                break
        except LockHeldError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_refusal_falls_back_to_the_recorded_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc shows no holder (another user's process), the pid in the file is named."""
    lockfile = tmp_path / "ws.lock"
    monkeypatch.setattr(lock, "holders", lambda fd: [])
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(lockfile)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "in"
        with pytest.raises(LockHeldError) as exc, lock.hold(lockfile, "tree /t"):
            pass
        assert exc.value.message == (f"tree /t is locked by another fsbuild (pid {other.pid}); "
                                     "wait for it to finish")
    finally:
        other.kill()
        other.wait()
    with lock.hold(lockfile, "tree /t"):   # released with its holder
        pass


HOLD = """
import sys, time
from pathlib import Path
from fsbuild import lock
with lock.hold(Path(sys.argv[1]), "x"):
    print("in", flush=True)
    time.sleep(60)
"""
