"""Stop and reload signals, handled by a thread of ours (not inside the signal handler).

Its own module so the command line can install it right after joining the
tlshd group, before the daemon's heavy imports: a SIGHUP or SIGTERM that
arrives while hsd is still loading is queued and acted on once serving starts,
instead of killing the process with the default action.  So it is installed
before the join and imports no logging (that is imported when a handler fails).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable


class SignalRelay:
    """Stop and reload signals, acted on by a thread of ours instead of inside the signal handler.

    Why: a Python signal handler runs in the main thread between two bytecodes of
    whatever it interrupted - possibly while that code holds a lock (a logging
    handler's, an Event's condition, the worker pool's).  A handler that logs,
    sets an Event or takes any other lock can then wait forever for itself, and
    every thread that wants the same lock waits with it.  So the handler only
    writes the signal number to a non-blocking self-pipe (os.write takes no
    lock); the "hsd-signals" thread reads it and does the work in ordinary code.

    The handler ignores signals in a forked child (an isolated handshake, before
    it resets its handlers): the pipe belongs to the process that made it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    _CLOSE = 0  # not a signal number: tells the thread to end

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(self._read_fd, True)
        self._previous: dict[int, object] = {}
        self._thread: threading.Thread | None = None
        self.act: Callable[[int], None] = lambda _signum: None  # runs in the thread

    def _handler(self, signum: int, _frame: object) -> None:
        """The whole signal handler: one write, no lock, no logging."""
        if os.getpid() != self._owner:
            return
        try:
            os.write(self._write_fd, bytes((signum,)))
        except OSError:
            pass  # pipe full: earlier signals are still queued, and stopping twice is stopping once

    def install(self) -> None:
        """Main thread only (signal.signal's rule); signals are queued until start()."""
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handler)

    def start(self, act: Callable[[int], None]) -> None:
        """From now on act(signum) runs for each signal, the queued ones first (a later call replaces act)."""
        self.act = act
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hsd-signals", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except InterruptedError:
                continue
            for signum in data:
                if signum == self._CLOSE:
                    return
                try:
                    self.act(signum)
                except Exception:  # noqa: BLE001  a failed reload must not end signal handling
                    import logging

                    logging.getLogger("hsd").exception("handling %s failed", signal.Signals(signum).name)
            if not data:
                return

    def close(self) -> None:
        """Previous handlers back, thread ended, pipe closed (signals after this get the old handlers)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
        if self._thread is not None:
            os.set_blocking(self._write_fd, True)
            os.write(self._write_fd, bytes((self._CLOSE,)))
            self._thread.join()
            self._thread = None
        os.close(self._read_fd)
        os.close(self._write_fd)
