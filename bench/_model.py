"""The model every server in the peer comparison serves: one seeded TorchScript MLP.

protoserve, MLServer and KServe's model server all load the same ``.pt`` file
written here, so the comparison measures the servers, not the models. The MLP is
small on purpose (64 -> 256 -> 64, about 33k weights): a request costs mostly
what the server adds around the model call, which is what the comparison is about.

Only torch is needed; the peers' own virtualenvs import nothing from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

INPUT = "INPUT0"
OUTPUT = "OUTPUT0"
FEATURES = 64
HIDDEN = 256
SEED = 0


class MLP(torch.nn.Module):
    """Linear(64, 256) - ReLU - Linear(256, 64): float32 ``[batch, 64]`` in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(FEATURES, HIDDEN)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(HIDDEN, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.act(self.fc1(x)))
        return out


def describe(path: Path) -> dict[str, Any]:
    """What a server and a load generator need to know about the model file at ``path``."""
    return {
        "path": str(path),
        "input": INPUT,
        "output": OUTPUT,
        "features": FEATURES,
        "hidden": HIDDEN,
        "datatype": "FP32",
        "shape": [-1, FEATURES],
        "seed": SEED,
    }


def build_torchscript(path: Path) -> dict[str, Any]:
    """Write the seeded MLP to ``path`` as TorchScript and return its description.

    The same seed gives the same weights on every run, so a file written
    by one run and the reference computed by another agree.
    """
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        module = MLP().eval()
    finally:
        # Seeding must not change the random stream of the process that builds the model.
        torch.random.set_rng_state(generator_state)
    scripted = torch.jit.script(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))  # type: ignore[no-untyped-call]
    return describe(path)


def sample_rows(count: int, *, seed: int = 1) -> list[list[float]]:
    """``count`` input rows of ``FEATURES`` floats in [-1, 1), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(count, FEATURES, generator=generator) * 2 - 1
    return [[float(v) for v in row] for row in rows]


def reference_output(path: Path, rows: list[list[float]]) -> list[list[float]]:
    """What the model at ``path`` answers for ``rows``, run directly in this process."""
    module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        out = module(torch.tensor(rows, dtype=torch.float32))
    return [[float(v) for v in row] for row in out]
