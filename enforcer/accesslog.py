"""The access log: one JSON line per request (and per failed handshake).

Theory of operation. Logging must never stop or kill serving, whoever reads the log. A pipe
whose reader stalls fills after ~64 KiB and then blocks every write; a pipe whose reader died
fails every write with EPIPE. So the trio loop never writes to the target itself:
:meth:`AccessLog.write` encodes the record and appends it to a buffer bounded in bytes, and a
writer thread drains the buffer into the file descriptor, in batches: it gathers records for
up to :data:`GATHER_SECONDS` after the first, so a busy server wakes it once per batch, not
once per request. When the buffer is full the record is
dropped and counted (:attr:`AccessLog.dropped`); the next record that fits is preceded by an
``access_log_dropped`` line saying how many were lost, and closing logs the total. When the
target is broken (EPIPE, or any write error) the writer stops writing for good and every later
record counts as dropped. A file target is reopened on :meth:`AccessLog.reopen` (SIGHUP, see
:func:`keep_access_log`), so logrotate can rename it and signal.

A regular file cannot stall on a reader either: it is written at once from the serving thread
(one ``write()`` per record, as nginx writes its access log), which spares the thread hand-off
per record that issue 18's profile found (a futex wake and a GIL switch per request). Pipes,
FIFOs, terminals and sockets go through the writer thread. An in-memory target (a
``StringIO``, as tests use) cannot block either: it is written at once.
"""

from __future__ import annotations

import atexit
import collections
import errno
import io
import json
import logging
import os
import signal
import stat
import sys
import threading
import weakref
from typing import Any, TextIO

import trio

log = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024
# Once a record is queued the writer gathers more for this long (or until GATHER_BYTES are
# queued) before writing: waking a thread per record cost the serving thread a futex wake and
# a GIL hand-off per request (issue 18's profile); under load one wake now carries many lines.
GATHER_SECONDS = 0.02
GATHER_BYTES = 64 * 1024
# How long closing waits for the writer to drain (a stalled reader may never take the rest).
CLOSE_TIMEOUT = 2.0


class AccessLog:
    """Writes JSON lines to a file, to standard output (``-``) or to an in-memory text stream."""

    def __init__(
        self, target: str | TextIO = "-", *, buffer_bytes: int = DEFAULT_BUFFER_BYTES
    ) -> None:
        self.dropped = 0  # records lost (buffer full or target broken), for tests and operators
        self.broken: str | None = None  # why the target stopped taking records, once it has
        self._path: str | None = None
        self._text: TextIO | None = None
        self._fd = -1
        self._owns_fd = False
        if target == "-":
            target = sys.stdout
        if isinstance(target, str):
            self._path = target
            self._fd = _open_append(target)
            self._owns_fd = True
        else:
            try:
                fd = target.fileno()
            except (OSError, ValueError, io.UnsupportedOperation):
                self._text = target  # in memory (or captured): nothing can block
            else:
                target.flush()  # what was printed before goes first
                self._fd = fd
        # A regular file has no reader that could stall or die: write it at once from the
        # serving thread, as nginx writes its access log (one write() per record, no thread).
        self._direct = self._fd >= 0 and stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._limit = buffer_bytes
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._unreported = 0  # drops not yet announced in the log itself
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._reopen = False
        self._thread: threading.Thread | None = None
        if self._text is None and not self._direct:
            self._thread = threading.Thread(
                target=self._drain, name="access-log-writer", daemon=True
            )
            self._thread.start()
            _open_logs.add(self)

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record as a JSON line; never blocks, never raises for the target's sake."""
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        if self._text is not None:
            self._write_text(line)
            return
        data = line.encode("utf-8", "backslashreplace")
        if self._direct:
            self._write_direct(data)
            return
        with self._cond:
            if self.broken is not None or self._closing:
                self.dropped += 1
                return
            if self._queued + len(data) > self._limit:
                self.dropped += 1
                self._unreported += 1
                return
            if self._unreported:
                data = _dropped_line(self._unreported, self.dropped, record.get("time")) + data
                self._unreported = 0
            # The writer waits on an empty queue (wake it on that edge, not per record), then
            # gathers: cut its gathering short once a batch is worth a write of its own.
            if not self._queue or self._queued < GATHER_BYTES <= self._queued + len(data):
                self._cond.notify()
            self._queue.append(data)
            self._queued += len(data)

    def reopen(self) -> None:
        """Reopen a file target before the next write (after logrotate renamed it)."""
        if self._path is None:
            return
        if self._direct:
            self._reopen_file()  # the serving thread is the only writer: reopen now
            self._direct = stat.S_ISREG(os.fstat(self._fd).st_mode)
            if not self._direct and self._thread is None:
                # Renamed and replaced by a FIFO: from now on through the writer thread.
                self._thread = threading.Thread(
                    target=self._drain, name="access-log-writer", daemon=True
                )
                self._thread.start()
                _open_logs.add(self)
            return
        with self._cond:
            self._reopen = True
            self._cond.notify()

    def close(self) -> None:
        """Write what is buffered (waiting at most a moment), then close a file this log opened."""
        _open_logs.discard(self)
        if self._text is not None:
            return
        if self._thread is None:  # written directly: nothing is buffered
            if not self._closing:
                self._closing = True
                if self.dropped:
                    log.warning("access log: %d record(s) dropped in all", self.dropped)
                if self._owns_fd:
                    os.close(self._fd)
            return
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        assert self._thread is not None
        self._thread.join(CLOSE_TIMEOUT)
        if self.dropped:
            log.warning("access log: %d record(s) dropped in all", self.dropped)
        if self._owns_fd and not self._thread.is_alive():
            os.close(self._fd)

    def _write_direct(self, data: bytes) -> None:
        if self.broken is not None or self._closing:
            self.dropped += 1
            return
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self._stop(exc.strerror or str(exc))

    def _write_text(self, line: str) -> None:
        if self.broken is not None:
            self.dropped += 1
            return
        assert self._text is not None
        try:
            self._text.write(line)
            self._text.flush()
        except (OSError, ValueError) as exc:
            self._stop(f"{type(exc).__name__}: {exc}")

    def _stop(self, reason: str) -> None:
        self.broken = reason
        self.dropped += 1
        log.warning(
            "access log: cannot write (%s); dropping records from now on (count in "
            "AccessLog.dropped, total logged at exit)",
            reason,
        )

    def _drain(self) -> None:
        """The writer thread: take everything queued, write it, repeat until closed."""
        while True:
            with self._cond:
                while not self._queue and not self._closing and not self._reopen:
                    self._cond.wait()
                if not self._closing and not self._reopen and self._queued < GATHER_BYTES:
                    self._cond.wait(GATHER_SECONDS)  # notified early by close, reopen, size
                batch = b"".join(self._queue)
                count = len(self._queue)
                self._queue.clear()
                self._queued = 0
                reopen, self._reopen = self._reopen, False
                closing = self._closing
            # Records queued before the signal belong to the old file (they may have waited
            # in the gather); a broken target is reopened first, so the batch is not lost.
            if reopen and self.broken is not None:
                self._reopen_file()
                reopen = False
            if batch and self.broken is None:
                try:
                    _write_all(self._fd, batch)
                except OSError as exc:
                    with self._cond:
                        # The batch is lost with the target; count its records too.
                        self.dropped += count - 1
                        self._stop(
                            "the reader went away (broken pipe)"
                            if exc.errno == errno.EPIPE
                            else exc.strerror or str(exc)
                        )
            elif batch:
                with self._cond:
                    self.dropped += count
            if reopen:
                self._reopen_file()
            if closing:
                return

    def _reopen_file(self) -> None:
        assert self._path is not None
        try:
            fd = _open_append(self._path)
        except OSError as exc:
            # Keep writing to the old file rather than losing records.
            log.warning("access log: cannot reopen %s: %s", self._path, exc.strerror or exc)
            return
        old, self._fd = self._fd, fd
        os.close(old)
        with self._cond:
            if self.broken is not None:
                log.warning("access log: reopened %s; writing again", self._path)
                self.broken = None


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _dropped_line(count: int, total: int, time: object) -> bytes:
    record = {"time": time, "event": "access_log_dropped", "dropped": count, "total": total}
    return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()


async def keep_access_log(access_log: AccessLog) -> None:
    """While the server runs, reopen the log's file on SIGHUP (logrotate); close it at the end."""
    try:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                access_log.reopen()
    finally:
        # Cancelled when the server stops: buffered lines reach the log before serving returns,
        # without waiting for the interpreter's exit (atexit is only the safety net).
        access_log.close()


# Logs with a writer thread, closed at exit so that buffered lines reach the file.
_open_logs: weakref.WeakSet[AccessLog] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for access_log in list(_open_logs):
        access_log.close()
