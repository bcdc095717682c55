"""Shared pieces of the language-model tests: prompts, the reference, a raw session."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import torch

from splitnet.v1 import generation_pb2 as gpb

PROMPT = 40
CHUNK = 23  # the 40-token prompt travels as two prefill chunks (23 + 17)
NEW_TOKENS = 64


def prompt_ids(vocab: int, n: int = PROMPT, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(lm, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    """transformers' own greedy generate(): the oracle."""
    ids = torch.tensor([prompt])
    out = lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt):].tolist()


class RawSession:
    """A Generate stream driven message by message, as a client written from the proto."""

    def __init__(self, address: str, metadata=None) -> None:
        self.channel = grpc.insecure_channel(address)
        call = self.channel.stream_stream(
            "/splitnet.v1.SplitGeneration/Generate",
            request_serializer=gpb.GenerateRequest.SerializeToString,
            response_deserializer=gpb.GenerateResponse.FromString,
        )
        self.requests: queue.Queue = queue.Queue()
        self.responses: Iterator[gpb.GenerateResponse] = call(
            iter(self.requests.get, None), metadata=metadata
        )

    def ask(self, **kind) -> gpb.GenerateResponse:
        self.requests.put(gpb.GenerateRequest(**kind))
        return next(self.responses)

    def open(self, **fields) -> gpb.Opened:
        return self.ask(open=gpb.OpenSession(**fields)).opened

    def cancel(self) -> None:
        self.responses.cancel()  # type: ignore[attr-defined]
        self.requests.put(None)

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


def code_of(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()
