"""Admission: how many requests the server holds at once, and for whom.

A request holds a slot from admission (for a chunked request: its header) until its
response is written or it fails. A full server answers ``RESOURCE_EXHAUSTED`` at once
rather than queueing silently.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from cloud.job import RequestError

__all__ = ["Admission"]


class Admission:
    """Counts requests in flight against ``max_in_flight``."""

    def __init__(self, max_in_flight: int, on_change: Callable[[int], None] | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._on_change = on_change  # e.g. the pending-requests gauge

    def acquire(self, client: str = "") -> None:
        """Take a slot for ``client``; ``RESOURCE_EXHAUSTED`` if none is free."""
        if self.in_flight >= self.max_in_flight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.max_in_flight} requests in flight; retry",
            )
        self.in_flight += 1
        if self._on_change is not None:
            self._on_change(self.in_flight)

    def release(self, client: str = "") -> None:
        """Give back a slot taken by ``acquire``."""
        self.in_flight -= 1
        if self._on_change is not None:
            self._on_change(self.in_flight)
