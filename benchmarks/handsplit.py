"""The split a user would write by hand: what splitnet's per-request cost is compared with.

The trained digits-cnn cut at ``pool1`` into two plain ``nn.Sequential`` halves; the
edge runs the head and sends the raw float32 bytes on a grpc.aio bidirectional stream;
the server (its own process) rebuilds the tensor with ``torch.frombuffer``, runs the
tail and sends back the logits' bytes. No protobuf, no validation, no codecs, no
batching, no timings: the floor of a real split.

    python -m benchmarks.handsplit serve WEIGHTS       # prints "port N"
"""

from __future__ import annotations

import asyncio
import queue
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import torch
from torch import nn

from splitnet.models import DigitsCNN, load_weights

__all__ = ["HandClient", "halves", "serve"]

METHOD = "/hand.Split/Run"
FRONTIER_SHAPE = (1, 32, 4, 4)  # digits-cnn after pool1, batch 1


def halves(weights: str) -> tuple[nn.Sequential, nn.Sequential]:
    """digits-cnn's head (up to ``pool1``) and tail, as plain sequential modules."""
    m = DigitsCNN()
    load_weights(m, weights)
    m.eval()
    head = nn.Sequential(m.stem, m.block, m.pool1).eval()
    tail = nn.Sequential(m.conv, m.pool2, m.flatten, m.fc1, m.relu, m.dropout, m.fc2).eval()
    return head, tail


def serve(weights: str) -> None:
    """Serve the tail on 127.0.0.1 (a free port, printed), until killed."""
    _, tail = halves(weights)
    torch.set_grad_enabled(False)

    async def run(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for data in requests:
            x = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(FRONTIER_SHAPE)
            yield tail(x).numpy().tobytes()

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(run)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("hand.Split", {"Run": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print("port", port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


class HandClient:
    """The edge half: head, raw bytes up one open stream, logits back."""

    def __init__(self, address: str, weights: str) -> None:
        self.head, _ = halves(weights)
        self.channel = grpc.insecure_channel(address)
        self._outbox: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (m := self._outbox.get()) is not None:
                yield m

        self._call = self.channel.stream_stream(METHOD)(requests())
        self._replies = iter(self._call)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """One request, one answer."""
        self._outbox.put(self.head(x).numpy().tobytes())
        return torch.frombuffer(bytearray(next(self._replies)), dtype=torch.float32).reshape(1, -1)

    def close(self) -> None:
        """End the stream and the channel."""
        self._outbox.put(None)
        self._call.cancel()
        self.channel.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        serve(sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks.handsplit serve WEIGHTS")
