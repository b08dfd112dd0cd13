"""Serving a TorchScript file or a ``torch.export`` archive for Predict."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from protoserve.server.runtime.model import Model

__all__ = ["TorchFileModel"]

log = logging.getLogger("protoserve.server")

_EXPORT_LOAD = threading.Lock()


class TorchFileModel(Model):
    """A compiled model from a file, called with its input tensors as positional arguments.

    Inputs are passed in the order of their names (``input0``, ``input1`` ...,
    or any names, sorted); a tensor result is the output ``output0``, a
    tuple or list of tensors ``output0``, ``output1`` ..., a dict keeps its keys.
    """

    name = "torchfile"
    description = "A TorchScript or torch.export model served for Predict."

    def __init__(self, path: Path) -> None:
        self.path = path
        self._module: Any = None

    def load(self) -> None:
        if self.path.suffix == ".pt2":
            # torch.export.load keeps its deserializer in a global: two worker threads
            # loading at once (models, or versions of one model) must take turns.
            with _EXPORT_LOAD:
                self._module = torch.export.load(str(self.path)).module()
        else:
            # torch 2.13 deprecates TorchScript but users still have such files: load
            # them quietly, and say once in the log that .pt2 (torch.export) is the way on.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self._module = torch.jit.load(str(self.path), map_location="cpu")  # type: ignore[no-untyped-call]
            log.info(
                "%s is TorchScript, which torch deprecates; torch.export (.pt2) "
                "files are served too",
                self.path,
            )
            self._module.eval()

    def warmup(self) -> None:
        # The input shapes are the model's own business: nothing generic to run.
        pass

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        args = [inputs[name] for name in sorted(inputs)]
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, torch.Tensor):
            return {"output0": result}
        if isinstance(result, dict):
            return {str(k): v for k, v in result.items()}
        if isinstance(result, tuple | list):
            return {f"output{i}": v for i, v in enumerate(result)}
        raise TypeError(f"the model returned {type(result).__name__}, not tensors")
