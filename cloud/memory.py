"""Giving freed memory back to the system after large requests (glibc only).

Measured with ``tests/test_attacks.py``: after a burst of large messages is refused,
glibc keeps the freed memory in two ways, and the server's resident memory stays up
by about what the burst held:

- **The dynamic mmap threshold.** A block of 128 KiB or more is mmapped, and munmapped
  when freed; but glibc then raises its threshold to the size of that block (up to
  32 MiB), so every later block of that size comes from the heap, which is not
  returned when it is freed. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``,
  which also turns the adjustment off) keeps large blocks mmapped: freed at once.
- **Free pages inside the heaps** of the arenas of gRPC's and the executor's threads,
  which glibc only returns from the top of a heap. ``malloc_trim(0)`` returns every
  free page; ``Trimmer`` calls it off the event loop when the resident memory is
  ``grow_bytes`` over its level at start, checked every ``interval_s`` (backing off while
  trims give little back: memory in use is not freed by trimming).

Elsewhere (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

__all__ = ["Trimmer", "manage_memory", "rss_bytes", "tune_allocator"]

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # blocks this large are mmapped (glibc's own default: 128 KiB)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (see the module docstring); False where not glibc."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def rss_bytes() -> int:
    """Resident memory of this process, bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class Trimmer:
    """Calls ``malloc_trim(0)`` when resident memory has grown (module docstring), from
    a daemon thread of its own: never on the event loop, and one per process.
    """

    def __init__(self, *, interval_s: float = 1.0, grow_bytes: int = 32 << 20) -> None:
        self.interval_s = interval_s
        self.grow_bytes = grow_bytes
        self.trims = 0
        self.freed_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)

    def start(self) -> Trimmer:
        """Start checking (nothing where glibc or /proc is not there)."""
        if _LIBC is not None and rss_bytes():
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop checking."""
        self._stop.set()

    def _run(self) -> None:
        baseline = rss_bytes()
        wait = self.interval_s
        while not self._stop.wait(wait):
            before = rss_bytes()
            if before - baseline < self.grow_bytes:
                wait = self.interval_s
                continue
            _trim()
            self.trims += 1
            freed = max(0, before - rss_bytes())
            self.freed_bytes += freed
            # Memory in use (a heavy load) is not freed by trimming: back off, up to a
            # minute; a trim that gave back a lot checks again soon.
            wait = self.interval_s if freed >= self.grow_bytes // 2 else min(wait * 2, 60.0)
            logger.debug("malloc_trim gave back %.1f MiB", freed / (1 << 20))


_PROCESS: list[Trimmer] = []
_LOCK = threading.Lock()


def manage_memory() -> Trimmer:
    """Tune the allocator and start the process's ``Trimmer`` (once per process)."""
    with _LOCK:
        if not _PROCESS:
            tune_allocator()
            _PROCESS.append(Trimmer().start())
        return _PROCESS[0]
