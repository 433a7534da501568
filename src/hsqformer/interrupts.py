"""SIGTERM and Ctrl-C as a visible, non-zero end of a command.

Lightning answers SIGTERM by raising ``SystemExit`` without a code (exit status 0), so a
scheduler would record a killed training run as a success, and it turns Ctrl-C into
status 1. Inside ``exit_on_signals`` both signals raise ``Interrupted`` instead, at once
(Lightning passes it through after its own clean-up, and every file is written
atomically, so nothing half-written is left); the command line prints one line and
exits with 128 + the signal number: 143 for SIGTERM, 130 for Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupted(BaseException):
    """The process received SIGTERM or SIGINT; not an ``Exception``, so no handler swallows it.

    ``hint`` is the one line the command line prints with it (e.g. how to resume).
    """

    def __init__(self, signum: int, hint: str = "") -> None:
        super().__init__(signum)
        self.signum = signum
        self.hint = hint

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def exit_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Raise ``Interrupted`` in this process when one of ``signals`` arrives; restores the old handlers after.

    Processes forked inside (data-loader workers) inherit the handler: there Ctrl-C, which a
    terminal sends to every process of the job, is ignored (the parent stops them), and SIGTERM
    ends the process as it would without the handler (the parent's shutdown uses it).
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            if signum != signal.SIGINT:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_WORKER_KILLED = re.compile(r"DataLoader worker \(pid[^)]*\) is killed by signal: (Terminated|Interrupt)")


def interruption_behind(err: BaseException) -> Interrupted | None:
    """The interruption that ``err`` is, was raised while handling, or reports, if any.

    A signal sent to a whole process group (as schedulers and ``kill -- -PGID`` do) also ends the
    data-loader workers. Their death surfaces in the main process as torch's ``RuntimeError``
    "DataLoader worker ... is killed by signal: Terminated", raised either while the main process
    handles its own signal or, when the workers' death is noticed first, before it: both are the
    same interruption.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, Interrupted):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    killed = _WORKER_KILLED.search(str(err)) if isinstance(err, RuntimeError) else None
    if killed:
        return Interrupted(signal.SIGTERM if killed.group(1) == "Terminated" else signal.SIGINT)
    return None
