"""Serving a TorchScript file or a ``torch.export`` archive for Predict."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.export.passes import move_to_device_pass

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

    The file loads onto the model's :attr:`~Model.device` (``map_location`` for
    TorchScript; a ``torch.export`` program is moved there, its graph's device
    constants too). With a :attr:`~Model.dtype` other than float32, its floating
    parameters and buffers are cast to it, and so are floating inputs; floating
    outputs come back as their declared dtype, or float32 when none is declared.
    With float32 (the default) inputs and outputs pass as they are.
    """

    follows_device = True  # its weights, caches and tensors go to self.device

    name = "torchfile"
    description = "A TorchScript or torch.export model served for Predict."

    def __init__(self, path: Path) -> None:
        self.path = path
        self._module: Any = None

    def load(self) -> None:
        device = self.device if isinstance(self.device, torch.device) else torch.device("cpu")
        if self.path.suffix == ".pt2":
            # torch.export.load keeps its deserializer in a global: two worker threads
            # loading at once (models, or versions of one model) must take turns.
            with _EXPORT_LOAD:
                program = torch.export.load(str(self.path))
            if device.type != "cpu":
                # Parameters, buffers and the device constants the graph holds.
                program = move_to_device_pass(program, device)
            self._module = program.module()
        else:
            # torch 2.13 deprecates TorchScript but users still have such files: load
            # them quietly, and say once in the log that .pt2 (torch.export) is the way on.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self._module = torch.jit.load(str(self.path), map_location=device)  # type: ignore[no-untyped-call]
            log.info(
                "%s is TorchScript, which torch deprecates; torch.export (.pt2) "
                "files are served too",
                self.path,
            )
            self._module.eval()
        if self._cast is not None:
            # Floating parameters and buffers only: integer ones (indices) stay.
            self._module.to(self._cast)

    @property
    def _cast(self) -> torch.dtype | None:
        """The dtype floating tensors are cast to: the model's, when not float32."""
        dtype = self.dtype
        return dtype if isinstance(dtype, torch.dtype) and dtype != torch.float32 else None

    def warmup(self) -> None:
        # The input shapes are the model's own business: nothing generic to run.
        pass

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        # The runtime has checked the inputs against the declared ones, names included.
        names = [spec.name for spec in self.inputs] if self.inputs else sorted(inputs)
        args = [inputs[name] for name in names]
        cast = self._cast
        if cast is not None:
            args = [t.to(cast) if t.is_floating_point() else t for t in args]
        with torch.inference_mode():
            result = self._module(*args)
        if cast is not None:
            result = self._uncast(result)
        if self.outputs:
            return self._declared_outputs(result, self.outputs)
        if isinstance(result, torch.Tensor):
            return {"output0": result}
        if isinstance(result, dict):
            return {str(k): v for k, v in result.items()}
        if isinstance(result, tuple | list):
            return {f"output{i}": v for i, v in enumerate(result)}
        raise TypeError(f"the model returned {type(result).__name__}, not tensors")

    def _uncast(self, result: object) -> object:
        """Floating outputs of a model cast to 16 bits, back in what the API declares:
        each declared output's dtype (in the declared order, or by a dict's keys), else
        float32. Anything else is left for the checks that follow."""
        declared = {spec.name: DTYPES.get(spec.dtype) for spec in self.outputs}
        order = list(declared.values())

        def back(value: object, want: torch.dtype | None) -> object:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                want = want if want is not None and want.is_floating_point else torch.float32
                return value.to(want)
            return value

        if isinstance(result, dict):
            return {k: back(v, declared.get(str(k))) for k, v in result.items()}
        if isinstance(result, tuple | list):
            return [back(v, order[i] if i < len(order) else None) for i, v in enumerate(result)]
        return back(result, order[0] if order else None)

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
