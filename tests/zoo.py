"""Small test models, one per graph shape the partitioner must handle."""

from __future__ import annotations

import torch
from torch import nn


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Residual(nn.Module):
    """Two tensors cross every cut inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.bn(self.conv1(x))))
        x = torch.relu(x + y)
        return self.head(x.mean(dim=(2, 3)))


class Inception(nn.Module):
    """Three branches that join with a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(3, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(3, 2, 1))
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class TupleOut(nn.Module):
    """Several outputs: a tuple of a classification and a regression head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 20), nn.GELU())
        self.cls = nn.Linear(20, 3)
        self.reg = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.cls(h), torch.sigmoid(self.reg(h))


class Shared(nn.Module):
    """One submodule applied twice: both halves may need it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 12)
        self.mid = nn.LayerNorm(12)
        self.out = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.proj(x))
        x = self.mid(x)
        x = torch.relu(self.proj(x))
        return self.out(x)


class TwoInputs(nn.Module):
    """Two inputs, both used late: the input cut sends both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) * z)


class NeedsExport(nn.Module):
    """fx cannot trace a branch on a shape; torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.a(x)))
        if h.shape[0] > 1:
            h = h * 2
        return self.b(h) + h[:, :4]


class Untraceable(nn.Module):
    """Data-dependent Python control flow: neither fx nor export can trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def _bn_with_stats(model: nn.Module) -> nn.Module:
    """Give batch-norm layers non-trivial running statistics (buffers)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def make(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    table = {
        "chain": (Chain, ((2, 16),)),
        "residual": (Residual, ((2, 3, 8, 8),)),
        "inception": (Inception, ((2, 3, 8, 8),)),
        "tuple": (TupleOut, ((3, 10),)),
        "shared": (Shared, ((2, 12),)),
        "two_inputs": (TwoInputs, ((2, 6), (2, 6))),
        "needs_export": (NeedsExport, ((3, 8),)),
    }
    cls, shapes = table[name]
    model = _bn_with_stats(cls())
    return model, tuple(torch.randn(s, generator=g) for s in shapes)


ZOO = ["chain", "residual", "inception", "tuple", "shared", "two_inputs", "needs_export"]


class Overflowing(nn.Module):
    """Outputs that hold +inf in their last column: int8 cannot carry them, raw can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        return torch.cat([out, torch.full_like(out[:, :1], float("inf"))], dim=1)
