"""The local model and valid requests: what every answer from the server is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from splitnet.codecs import encode
from splitnet.models import fingerprint, load_model
from splitnet.partition import trace
from splitnet.v1 import inference_pb2 as pb

__all__ = ["MIX", "MODEL", "SERVICE", "TOLERANCE", "Reference", "tolerance"]

MODEL = "digits-cnn"
SERVICE = "/splitnet.v1.SplitInference/"
C = grpc.StatusCode
# Tolerance on the model output, relative to the output's largest magnitude. Lossless
# codecs still differ by float rounding when the server batches requests together.
TOLERANCE = {"raw": 1e-5, "zstd": 1e-5, "fp16": 2e-3, "bf16": 1e-2, "int8": 3e-2, "int8c": 3e-2}
MIX = (  # (cut, codec) pairs the load and fault runs rotate through
    ("input", "raw"),
    ("pool1", "int8+zstd:1"),
    ("stem.2", "fp16"),
    ("block.relu", "zstd:1"),
    ("conv.2", "int8c+zstd"),
    ("fc1", "bf16"),
)


def tolerance(codec: str) -> float:
    """The output tolerance for a codec spec such as ``int8+zstd:1``."""
    first = codec.split("+")[0].split(":")[0]
    return TOLERANCE.get(first, 1e-5)


@dataclass
class Reference:
    """The local model, valid frontiers at a few cuts, and the outputs they must give."""

    model: torch.nn.Module
    fingerprint: str
    xs: torch.Tensor  # inputs, one per row
    expected: torch.Tensor  # model(xs), row by row
    requests: dict[str, pb.InferRequest]  # a valid raw request per cut (batch 1, row 0)

    @classmethod
    def build(cls, weights: Path, n: int = 64) -> Reference:
        """The model from ``weights``, ``n`` test digits and their outputs."""
        from splitnet.data import load_digits

        model = load_model(MODEL, weights)
        xs = load_digits()["test"].x[:n]
        with torch.no_grad():
            expected = torch.cat([model(xs[i : i + 1]) for i in range(len(xs))])
        graph = trace(model, (xs[:1],))
        fp = fingerprint(model)
        requests = {}
        for cut in ("input", "pool1", "block.relu", "fc1"):
            head, _ = graph.split(cut)
            with torch.no_grad():
                out = head(xs[:1])
            frontier = list(out) if isinstance(out, (tuple, list)) else [out]
            requests[cut] = pb.InferRequest(
                id=1,
                model=MODEL,
                cut=cut,
                fingerprint=fp,
                frontier=[encode(t, "raw") for t in frontier],
            )
        return cls(model, fp, xs, expected, requests)

    def check(self, output: torch.Tensor, index: int, codec: str) -> bool:
        """Is ``output`` the model's output for input ``index`` within the codec's tolerance?"""
        want = self.expected[index : index + 1]
        if output.shape != want.shape:
            return False
        scale = max(float(want.abs().max()), 1e-6)
        return bool(((output - want).abs().max() <= tolerance(codec) * scale).item())
