"""Serving a TorchScript file or a ``torch.export`` archive for Predict."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from protoserve.server.runtime.errors import FailedPrecondition
from protoserve.server.runtime.model import Model, TensorInfo
from protoserve.server.runtime.tensors import DTYPES

__all__ = ["FILE_SUFFIXES", "TorchFileModel"]

log = logging.getLogger("protoserve.server")

#: The files served: TorchScript (``torch.jit.save``) and ``torch.export`` (``.pt2``).
FILE_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".pt2")

_EXPORT_LOAD = threading.Lock()


class TorchFileModel(Model):
    """A compiled model from a file, called with its input tensors as positional arguments.

    A file cannot say what it takes, so by default inputs are passed in the order
    of their names (``input0``, ``input1`` ..., or any names, sorted); a tensor
    result is the output ``output0``, a tuple or list of tensors ``output0``,
    ``output1`` ..., a dict keeps its keys.

    With :attr:`inputs` declared (a model repository's ``[inputs.NAME]``), inputs
    are passed in the declared order; with :attr:`outputs` declared, results are
    named by them in order (a dict's keys must be the declared names). A result
    that does not fit the declared outputs fails the request with
    FAILED_PRECONDITION naming the mismatch: the declaration needs fixing.
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
        # The runtime has checked the inputs against the declared ones, names included.
        names = [spec.name for spec in self.inputs] if self.inputs else sorted(inputs)
        args = [inputs[name] for name in names]
        with torch.inference_mode():
            result = self._module(*args)
        if self.outputs:
            return self._declared_outputs(result, self.outputs)
        if isinstance(result, torch.Tensor):
            return {"output0": result}
        if isinstance(result, dict):
            return {str(k): v for k, v in result.items()}
        if isinstance(result, tuple | list):
            return {f"output{i}": v for i, v in enumerate(result)}
        raise TypeError(f"the model returned {type(result).__name__}, not tensors")

    def _declared_outputs(
        self, result: object, declared: Sequence[TensorInfo]
    ) -> dict[str, torch.Tensor]:
        """``result`` named by the declared outputs, each checked against its declaration.

        Raises:
            FailedPrecondition: the result does not fit the declared outputs.
        """
        names = [spec.name for spec in declared]
        values: list[object]
        if isinstance(result, dict):
            if set(map(str, result)) != set(names):
                self._mismatch(f"returned outputs {sorted(map(str, result))}", names)
            by_name = {str(k): v for k, v in result.items()}
            values = [by_name[name] for name in names]
        else:
            values = list(result) if isinstance(result, tuple | list) else [result]
            if len(values) != len(names):
                self._mismatch(f"returned {len(values)} tensors", names)
        out: dict[str, torch.Tensor] = {}
        for spec, value in zip(declared, values, strict=True):
            if not isinstance(value, torch.Tensor):
                self._mismatch(f"returned {type(value).__name__} for {spec.name!r}", names)
            shape = tuple(value.shape)
            fits = len(shape) == len(spec.shape) and all(
                want in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
            )
            if DTYPES.get(spec.dtype) not in (None, value.dtype) or not fits:
                got = f"{str(value.dtype).removeprefix('torch.')} {list(shape)}"
                want = f"{spec.dtype} {list(spec.shape)}"
                self._mismatch(f"returned {spec.name!r} as {got}, declared {want}", names)
            out[spec.name] = value
        return out

    def _mismatch(self, what: str, names: Sequence[str]) -> NoReturn:
        raise FailedPrecondition(
            f"model file {self.path.name} {what}, but its declared outputs are {names}; "
            "fix the outputs in model.toml"
        )
