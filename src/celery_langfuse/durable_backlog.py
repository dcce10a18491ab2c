"""What a process holds while its durable queue cannot be written: memory, then disk.

When the queue's Redis (or RabbitMQ) does not answer, the durable exporter keeps each
encoded batch in a :class:`Backlog` instead of losing it, and writes it to the queue
once it answers again. The backlog has two bounds, both in payload bytes:

- memory (``durable_buffer_bytes``, per process): the newest batches;
- optionally a local directory (``durable_spill_dir``, bounded by
  ``durable_spill_max_bytes`` and shared by every process of the host): batches that
  no longer fit in memory, and everything still held when a process exits.

Past both bounds the oldest batches are dropped and counted: after a long outage the
newest data is kept, as the queue itself does.

The directory holds one file per batch, named so that names sort oldest first and
carry the span count: ``<time ns>-<pid>-<seq>-<spans>.otlp.gz``, the body as the
queue holds it. Files appear by an atomic rename, and a process takes one by renaming
it to ``<name>.<its pid>`` first, so two processes of a host draining the directory
after an outage never write the same batch twice. A taken file whose process died is
put back on the next drain.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_SUFFIX = ".otlp.gz"


@dataclass(frozen=True)
class Held:
    """One batch waiting for the queue. ``file`` is set for a batch taken from disk."""

    data: bytes
    spans: int
    file: Optional[Path] = None


@dataclass
class Counts:
    """How many batches and spans; mutable running totals."""

    batches: int = 0
    spans: int = 0

    def add(self, batches: int, spans: int) -> None:
        self.batches += batches
        self.spans += spans


class SpillDir:
    """A directory of batches bounded in bytes (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._seq = itertools.count()
        self.path.mkdir(parents=True, exist_ok=True)
        # Bytes held at the last full scan plus those written since: a full scan of a
        # large directory on every write would cost more the longer the outage.
        self._held_estimate = 0
        self._scanned_at = -1.0
        #: Names from the last listing, oldest first, for take_oldest.
        self._oldest_first: deque[str] = deque()

    def write(self, data: bytes, spans: int) -> Counts:
        """Store a batch, first removing the oldest files as the bound requires; what
        was removed. A batch larger than the whole bound is not stored (and counted)."""
        dropped = Counts()
        if len(data) > self.max_bytes:
            dropped.add(1, spans)
            return dropped
        now = time.monotonic()
        if self._held_estimate + len(data) > self.max_bytes or now - self._scanned_at > 1.0:
            # Near the bound (or a second since the last look, other processes write
            # here too): count exactly, and make room from the oldest.
            self._scanned_at = now
            files = self._files()
            held = sum(size for _, size in files) + self._taken_bytes()
            for name, size in files:
                if held + len(data) <= self.max_bytes:
                    break
                if self._take(name) is not None:
                    (self.path / f"{name}.{os.getpid()}").unlink(missing_ok=True)
                    dropped.add(1, _spans_of(name))
                held -= size
            self._held_estimate = held
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq)}-{spans}{_SUFFIX}"
        temporary = self.path / f".{name}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, self.path / name)
        self._held_estimate += len(data)
        return dropped

    def take_oldest(self) -> Optional[Held]:
        """The oldest batch no other process took; it is this process's until
        :meth:`done` or :meth:`put_back`."""
        for refill in (False, True):
            if refill:
                self._oldest_first = deque(sorted(
                    e.name for e in self._entries()
                    if e.name.endswith(_SUFFIX) and not e.name.startswith(".")
                ))  # fmt: skip
            while self._oldest_first:
                name = self._oldest_first.popleft()
                data = self._take(name)
                if data is not None:
                    return Held(data, _spans_of(name), self.path / f"{name}.{os.getpid()}")
        return None

    def done(self, held: Held) -> None:
        if held.file is not None:
            held.file.unlink(missing_ok=True)

    def put_back(self, held: Held) -> None:
        if held.file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.replace(held.file, held.file.with_suffix(""))

    def totals(self) -> Counts:
        """Every batch in the directory, those being written right now included."""
        counts = Counts()
        for entry in self._entries():
            stem = entry.name if entry.name.endswith(_SUFFIX) else entry.name.rpartition(".")[0]
            if stem.endswith(_SUFFIX) and not entry.name.startswith("."):
                counts.add(1, _spans_of(stem))
        return counts

    def recover_orphans(self) -> None:
        """Put back the files taken by processes that no longer exist."""
        for entry in self._entries():
            stem, _, pid = entry.name.rpartition(".")
            if stem.endswith(_SUFFIX) and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(entry.path, self.path / stem)

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        try:
            yield from os.scandir(self.path)
        except FileNotFoundError:
            self.path.mkdir(parents=True, exist_ok=True)

    def _files(self) -> list[tuple[str, int]]:
        """Batch files not taken by any process, oldest first, with their sizes."""
        files = []
        for entry in self._entries():
            if entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # taken meanwhile
                    files.append((entry.name, entry.stat().st_size))
        files.sort()
        return files

    def _taken_bytes(self) -> int:
        """Bytes of the files processes are writing to the queue right now."""
        total = 0
        for entry in self._entries():
            if not entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        return total

    def _take(self, name: str) -> Optional[bytes]:
        taken = self.path / f"{name}.{os.getpid()}"
        try:
            os.rename(self.path / name, taken)
        except FileNotFoundError:
            return None  # another process took it first
        return taken.read_bytes()


class Backlog:
    """Batches held in memory, overflowing to an optional :class:`SpillDir`.

    Thread-safe. ``dropped`` is the running total of what the bounds removed.
    """

    def __init__(self, max_bytes: int, spill: Optional[SpillDir] = None) -> None:
        self.max_bytes = max_bytes
        self.spill = spill
        self.dropped = Counts()
        self.spilled = Counts()
        self._lock = threading.Lock()
        self._memory: deque[Held] = deque()
        self._memory_bytes = 0
        self._in_flight: Optional[Held] = None
        self._in_flight_evicted = False

    def reset(self) -> None:
        """Forget what memory holds (a forked child: its parent still holds it)."""
        self._lock = threading.Lock()
        self._memory = deque()
        self._memory_bytes = 0
        self._in_flight = None
        self._in_flight_evicted = False

    def add(self, data: bytes, spans: int) -> None:
        with self._lock:
            self._memory.append(Held(data, spans))
            self._memory_bytes += len(data)
            while self._memory_bytes > self.max_bytes and self._memory:
                self._evict(self._memory.popleft())

    def _evict(self, held: Held) -> None:
        """Move the oldest batch in memory to disk, or drop it; under the lock."""
        self._memory_bytes -= len(held.data)
        if held is self._in_flight:
            self._in_flight_evicted = True  # the writer decides (see take_oldest)
            return
        if self.spill is None:
            self.dropped.add(1, held.spans)
            return
        try:
            dropped = self.spill.write(held.data, held.spans)
        except OSError:
            dropped = Counts(1, held.spans)  # disk full, directory gone: counted
        self.spilled.add(1, held.spans)
        self.dropped.add(dropped.batches, dropped.spans)

    def take_oldest(self) -> Optional[Held]:
        """The oldest batch: from disk first, then memory. Give it back with
        :meth:`put_back` if it could not be written, or confirm with :meth:`done`."""
        if self.spill is not None:
            try:
                held = self.spill.take_oldest()
            except OSError:
                held = None
            if held is not None:
                return held
        with self._lock:
            # Left in place while it is written, so that what the backlog holds stays
            # counted; removed by done(). Evicting it meanwhile leaves it to the
            # writer: it is written, or dropped by put_back(), never both.
            self._in_flight = self._memory[0] if self._memory else None
            self._in_flight_evicted = False
            return self._in_flight

    def done(self, held: Held) -> None:
        if held.file is not None:
            if self.spill is not None:
                self.spill.done(held)
            return
        with self._lock:
            if not self._in_flight_evicted and self._memory and self._memory[0] is held:
                self._memory.popleft()
                self._memory_bytes -= len(held.data)
            self._in_flight = None

    def put_back(self, held: Held) -> None:
        if held.file is not None:
            if self.spill is not None:
                self.spill.put_back(held)
            return
        with self._lock:
            self._in_flight = None
            if self._in_flight_evicted:
                self._in_flight_evicted = False
                self._memory_bytes += len(held.data)
                self._evict(held)

    def spill_all(self) -> Counts:
        """Move everything in memory to disk (a process about to exit); what could
        not be kept (no spill directory, or past its bound) is dropped and counted,
        and returned."""
        before = Counts(self.dropped.batches, self.dropped.spans)
        with self._lock:
            # A batch still being written counts as not written: the process exits
            # before the attempt can be relied on.
            in_flight, evicted = self._in_flight, self._in_flight_evicted
            self._in_flight, self._in_flight_evicted = None, False
            if in_flight is not None and evicted:
                self._memory_bytes += len(in_flight.data)
                self._evict(in_flight)
            while self._memory:
                self._evict(self._memory.popleft())
        return Counts(self.dropped.batches - before.batches, self.dropped.spans - before.spans)

    def in_memory(self) -> Counts:
        with self._lock:
            counts = Counts(len(self._memory), sum(h.spans for h in self._memory))
            if self._in_flight is not None and self._in_flight_evicted:
                counts.add(1, self._in_flight.spans)
            return counts

    def memory_bytes(self) -> int:
        return self._memory_bytes

    def on_disk(self) -> Counts:
        if self.spill is None:
            return Counts()
        try:
            return self.spill.totals()
        except OSError:
            return Counts()

    def is_empty(self) -> bool:
        with self._lock:
            if self._memory:
                return False
        return self.spill is None or self.on_disk().batches == 0


def _spans_of(name: str) -> int:
    try:
        return int(name.removesuffix(_SUFFIX).rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
