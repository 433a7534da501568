"""Parallel points and trials as child processes: one GPU or a share of the CPU cores each, a log each, a clean stop.

Each child is this package's own command line (``hsqformer sweep ... --point K`` or a search
worker), started in a session of its own so that a terminal's Ctrl-C reaches only the parent.
When the parent is interrupted (SIGTERM, Ctrl-C), it passes SIGTERM to every child's process
group and waits for them: each child then stops the way ``hsqformer cv`` does, keeping its
finished folds for the next run. On Linux a child also gets SIGTERM when the parent dies by
SIGKILL, so no orphan keeps training beside a later, resumed run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hsqformer.errors import HSQformerError

PARENT_ENV = "HSQFORMER_PARENT_PID"
_CHILD_ENTRY = "from hsqformer.sweep.processes import child_main; child_main()"
_POLL_SECONDS = 1.0
_STOP_SECONDS = 120.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Job:
    """One child: what it runs (for messages), its ``hsqformer`` arguments and its log file."""

    label: str
    args: list[str]
    log: Path


def parse_devices(text: str | None) -> list[str]:
    """``--devices 0,1,3`` as a list of CUDA device ids (empty: no devices given)."""
    if text is None:
        return []
    devices = [item.strip() for item in text.split(",")]
    if not all(devices):
        raise HSQformerError(f"--devices '{text}': expected comma-separated GPU ids such as 0,1")
    return devices


def slot_environments(jobs: int, devices: Sequence[str]) -> list[dict[str, str]]:
    """Environment additions per parallel slot.

    With devices, slot i sees only ``devices[i % len(devices)]`` (CUDA_VISIBLE_DEVICES), so that
    concurrent jobs use different GPUs while there are enough. Without, the jobs share the CPU:
    each gets ``OMP_NUM_THREADS`` = usable cores // jobs, unless OMP_NUM_THREADS is already set.
    """
    if devices:
        return [{"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} for i in range(jobs)]
    if jobs == 1 or os.environ.get("OMP_NUM_THREADS"):
        return [{} for _ in range(jobs)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [{"OMP_NUM_THREADS": str(max(1, cores // jobs))} for _ in range(jobs)]


def run_jobs(
    jobs: Sequence[Job],
    parallel: int,
    devices: Sequence[str],
    on_end: Callable[[Job, int], None],
    say: Callable[[str], None],
) -> list[tuple[Job, int]]:
    """Run ``jobs`` as child processes, at most ``parallel`` at a time; returns the failed ones with their exit status.

    ``on_end(job, status)`` is called as each ends. An interruption of this process (``Interrupted``)
    stops every running child first, then goes on.
    """
    environments = slot_environments(parallel, devices)
    pending = list(jobs)
    running: dict[int, tuple[Job, subprocess.Popen, IO[bytes]]] = {}
    failed: list[tuple[Job, int]] = []
    try:
        while pending or running:
            for slot in range(parallel):
                if slot in running or not pending:
                    continue
                job = pending.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = job.log.open("ab")
                extra = environments[slot]
                process = subprocess.Popen(
                    [sys.executable, "-c", _CHILD_ENTRY, *job.args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **extra, PARENT_ENV: str(os.getpid())},
                    start_new_session=True,
                )
                running[slot] = (job, process, log)
                where = ", ".join(f"{key}={value}" for key, value in extra.items())
                say(f"{job.label}: started{' (' + where + ')' if where else ''}, log {job.log}")
            time.sleep(_POLL_SECONDS)
            for slot, (job, process, log) in list(running.items()):
                status = process.poll()
                if status is None:
                    continue
                log.close()
                del running[slot]
                if status != 0:
                    failed.append((job, status))
                on_end(job, status)
    except BaseException:
        _stop([(process, log) for _, process, log in running.values()], say)
        raise
    return failed


def _stop(children: list[tuple[subprocess.Popen, IO[bytes]]], say: Callable[[str], None]) -> None:
    """SIGTERM to each child's process group, then wait (SIGKILL after ``_STOP_SECONDS``)."""
    if not children:
        return
    say(f"stopping {len(children)} running child process{'es' if len(children) > 1 else ''}")
    for process, _ in children:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_SECONDS
    for process, log in children:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        log.close()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def log_tail(path: Path) -> str:
    """The last non-empty line of a child's log (its one-line error, as a rule)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def child_main() -> None:
    """Entry point of a child: die with the parent (Linux), then run the ``hsqformer`` command line."""
    parent = os.environ.get(PARENT_ENV)
    if sys.platform.startswith("linux") and parent:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != int(parent):  # the parent died before prctl took effect
            sys.exit(128 + signal.SIGTERM)
    sys.argv = ["hsqformer", *sys.argv[1:]]
    from hsqformer.cli import main

    main()
