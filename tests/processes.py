"""What the kernel says of a test's child process, for failure messages."""
from __future__ import annotations

from pathlib import Path


def signal_masks(pid: int) -> str:
    """The child's blocked, ignored and caught signal masks (``SigBlk``, ``SigIgn``, ``SigCgt``):
    a signal the test sends is lost when the child blocks or ignores it."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"(no /proc/{pid}/status: {exc})"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
