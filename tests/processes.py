"""Child processes of the tests: what the kernel says of one, for failure messages, and a
headless Locust run that cannot outlive its test."""
from __future__ import annotations

import signal
from pathlib import Path


def signal_masks(pid: int) -> str:
    """The child's blocked, ignored and caught signal masks (``SigBlk``, ``SigIgn``, ``SigCgt``):
    a signal the test sends is lost when the child blocks or ignores it."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"(no /proc/{pid}/status: {exc})"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def run_headless_locust(scenario: str, *args: str, cwd, timeout_s: float = 120) -> None:
    """Run ``locust -f loadtests/<scenario>.py --headless ARGS`` to its end in a session of its
    own (asserting exit 0, with its stderr when not), and kill that session, the gateway it
    started included, whatever happens."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-m", "locust", "-f", str(root / "loadtests" / f"{scenario}.py"),
                                "--headless", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
        assert process.returncode == 0, stderr[-3000:]
    finally:
        kill_session(process)


def kill_session(process) -> None:
    """Kill a process started with ``start_new_session`` and whatever is still in its session
    (a gateway it started), then reap it."""
    import os
    import subprocess

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
