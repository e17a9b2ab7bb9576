"""The processes PipeMax starts on one node (stage processes, data-parallel replicas): how they
start, how they end, and how they take signals.

* Start: multiprocessing's spawn runs the parent's script again in each new process to find its
  functions. A script that creates its LLM at top level, not under `if __name__ == "__main__":`,
  would start processes from inside that import; such a process leaves at once with a status of
  its own, and its parent names the fix (exit_if_importing_main, process_ended).
* End: a child dies with its parent (PR_SET_PDEATHSIG); its parent names how it ended, and a
  stage that stopped answering because it is stopped (SIGSTOP, a debugger) is named as such.
* Signals: Ctrl-C and SIGTERM reach every process of a job at once; a process that serves a head
  lets the head decide (let_the_head_decide).

Children and parents talk over pipes, not multiprocessing queues or locks: those hold named
semaphores that the resource tracker reports as leaked when the parent is killed (SIGKILL).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
from pathlib import Path

# The exit status of a process that found itself creating an LLM while multiprocessing imported
# the script again: a status of its own, so its parent can say what to change.
IMPORTED_MAIN_EXIT_STATUS = 86
MAIN_GUARD_ADVICE = ("every stage or replica process imports the script again (multiprocessing's spawn), and this "
                     "script creates its LLM as it is imported: create it under `if __name__ == \"__main__\":`")


def exit_if_importing_main() -> None:
    """Call before starting a process. In a process that multiprocessing is still preparing (the
    import of the parent's script), starting another would fail with a long traceback while the
    parent waits for a rendezvous: leave at once and quietly instead; the parent recognises the
    status and gives the advice once. (multiprocessing's own test for this case reads the same flag.)"""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(IMPORTED_MAIN_EXIT_STATUS)


def process_ended(name: str, exit_code: int | None, doing: str) -> str:
    """Why the child process `name` is gone, as a sentence for an error."""
    if exit_code == IMPORTED_MAIN_EXIT_STATUS:
        return f"{name} could not start: {MAIN_GUARD_ADVICE}"
    return f"{name} {exit_reason(exit_code)} while {doing}"


def exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def process_is_stopped(pid: int) -> bool:
    """Stopped by SIGSTOP (or a debugger): alive, but it runs nothing."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def let_the_head_decide(signals=(signal.SIGINT, signal.SIGTERM), grace: float = 10.0) -> dict:
    """For a process that serves a head (a stage, a replica head under torchrun): these signals
    reach every process of a job at once (Ctrl-C the terminal's process group; torchrun and batch
    schedulers every rank). Such a process has nothing of its own to save, so it goes on serving:
    the head reports the interruption and tells it to stop, where a process that died first would
    be reported as a lost stage (and print its own traceback). If no stop comes within `grace`
    seconds (the head is gone or stuck), it leaves at once, quietly, with the signal's status.
    Returns the previous handlers, for signal.signal."""
    def on_signal(signum, frame):
        timer = threading.Timer(grace, lambda: os._exit(128 + signum))
        timer.daemon = True
        timer.start()

    return {signum: signal.signal(signum, on_signal) for signum in signals}
