"""Small real models for the model repository's tests, named in ``model.toml`` as
``source = "tests.server.repository_models:Class"``."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from protoserve.server import Model, TensorInfo


class RowTripler(Model):
    """Predict on rows of two floats: y = 3x; rows may be batched together."""

    name = "row-tripler"
    predict_batches = True
    inputs = (TensorInfo("x", "float32", (-1, 2)),)
    outputs = (TensorInfo("y", "float32", (-1, 2)),)

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        return {"y": inputs["x"] * 3}


class Held(Model):
    """Predict: y = x + 1, once ``release`` is set; ``entered`` is set when a call began.

    A request stays in flight for as long as a test needs.
    """

    name = "held"
    entered: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        type(self).entered.set()
        type(self).release.wait(30)
        return {"y": inputs["x"] + 1}


class SlowToLoad(Model):
    """Loading waits until ``release`` is set; ``loading`` is set when a load began."""

    name = "slow-to-load"
    loading: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    def load(self) -> None:
        type(self).loading.set()
        type(self).release.wait(30)

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        return {"y": inputs["x"]}


class NoNegatives(Model):
    """Predict: y = x, but a negative input is an error (a warm-up input can trip it)."""

    name = "no-negatives"

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        x = inputs["x"]
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return {"y": x}


class NeedsArguments(Model):
    """Cannot be built with no arguments, as the repository builds models."""

    name = "needs-arguments"

    def __init__(self, weights: str) -> None:
        self.weights = weights
