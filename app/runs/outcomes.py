"""What an executor reports of a run: its agent's start, its exit code (a death by signal in
the shell's form) and the summary a person reads."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

SIGNALS = {
    2: "interrupted (SIGINT)",
    6: "aborted (SIGABRT)",
    9: "killed (out of memory or external signal)",
    11: "crashed (segmentation fault)",
    15: "terminated (SIGTERM)",
}


def normalise_exit_code(returncode: int) -> int:
    """Popen reports death by signal N as -N; shells say 128+N. We store the shell's form."""
    return 128 - returncode if returncode < 0 else returncode


def error_summary(exit_code: int) -> str | None:
    if exit_code == 0:
        return None
    if exit_code == 127:
        return "command not found (exit 127)"
    if exit_code == 126:
        return "command not executable (exit 126)"
    if exit_code > 128 and exit_code - 128 in SIGNALS:
        return f"{SIGNALS[exit_code - 128]} (exit {exit_code})"
    return f"exited with code {exit_code}"


class Started(NamedTuple):
    """An agent's start that the executor has not written yet (it may go with the end)."""

    at: datetime
    pid: int | None
    version: str | None
