"""Admission: how much the server holds at once, in all and per client.

- **Slots.** A request holds one of ``max_in_flight`` slots from admission (for a
  chunked request: its header) until it is answered or fails. A full server answers
  ``RESOURCE_EXHAUSTED`` at once rather than queueing silently.
- **Fair shares.** Once half the slots are taken, a client may hold at most its share,
  ``max_in_flight / clients holding slots``: one client cannot starve the others. A
  client is its bearer token where the server requires one (devices behind one NAT
  stay apart), else its peer address without the port.
- **Pending bytes.** A chunked request reserves the bytes it announces when its
  header is admitted, against a server-wide budget (``max_pending_bytes``) shared by
  every stream and connection, and gives them back once decoded or failed. Memory held
  by unfinished requests therefore never exceeds the budget, whatever the clients do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import grpc

from cloud.job import RequestError

__all__ = ["Admission"]

MiB = 1 << 20


class Admission:
    """Slots, fair shares and the pending-bytes budget (see the module docstring)."""

    def __init__(
        self,
        max_in_flight: int,
        max_pending_bytes: int,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_pending_bytes = max_pending_bytes
        self.in_flight = 0
        self.pending_bytes = 0
        self.per_client: Counter[str] = Counter()
        self._on_change = on_change  # e.g. the pending-requests gauge

    def acquire(self, client: str) -> None:
        """Take a slot for ``client``; ``RESOURCE_EXHAUSTED`` if none is free to it."""
        if self.in_flight >= self.max_in_flight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.max_in_flight} requests in flight; retry",
            )
        held = self.per_client[client]
        if held and self.in_flight * 2 >= self.max_in_flight:  # contended: shares apply
            share = max(1, self.max_in_flight // len(self.per_client))
            if held >= share:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this client holds {held} of the server's {self.max_in_flight} request "
                    f"slots, its fair share while {len(self.per_client)} clients are active; "
                    "retry after an answer",
                )
        self.in_flight += 1
        self.per_client[client] = held + 1
        if self._on_change is not None:
            self._on_change(self.in_flight)

    def release(self, client: str) -> None:
        """Give back a slot taken by ``acquire``."""
        self.in_flight -= 1
        held = self.per_client[client] - 1
        if held > 0:
            self.per_client[client] = held
        else:
            del self.per_client[client]
        if self._on_change is not None:
            self._on_change(self.in_flight)

    def reserve(self, nbytes: int) -> None:
        """Reserve ``nbytes`` of the pending budget; ``RESOURCE_EXHAUSTED`` if it is spent."""
        if self.pending_bytes + nbytes > self.max_pending_bytes:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server holds {self.pending_bytes / MiB:.1f} MiB of unfinished chunked "
                f"requests; {nbytes / MiB:.1f} MiB more would pass its budget of "
                f"{self.max_pending_bytes / MiB:.0f} MiB (--max-pending-mb); retry",
            )
        self.pending_bytes += nbytes

    def unreserve(self, nbytes: int) -> None:
        """Give back ``nbytes`` reserved by ``reserve``."""
        self.pending_bytes -= nbytes
