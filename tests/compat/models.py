"""Models the compatibility tests serve: Triton's `simple` add/sub example, per data type.

Imported by the *server* process (torch and protoserve installed), never by the
tests, which run in a venv with tritonclient and without protoserve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from protoserve.server import Model, TensorInfo

#: Elements per row, as in Triton's `simple` model.
WIDTH = 16


def _add_sub(dtype: str) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    shape = (-1, WIDTH)  # rows are the batch dimension
    return (
        (TensorInfo("INPUT0", dtype, shape), TensorInfo("INPUT1", dtype, shape)),
        (TensorInfo("OUTPUT0", dtype, shape), TensorInfo("OUTPUT1", dtype, shape)),
    )


class AddSub(Model):
    """OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1, row by row."""

    predict_batches: ClassVar[bool] = True

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}


class AddSubFP32(AddSub):
    """AddSub on float32 (FP32)."""

    name = "add_sub_fp32"
    inputs, outputs = _add_sub("float32")


class AddSubINT64(AddSub):
    """AddSub on int64 (INT64)."""

    name = "add_sub_int64"
    inputs, outputs = _add_sub("int64")


class AddSubFP16(AddSub):
    """AddSub on float16 (FP16)."""

    name = "add_sub_fp16"
    inputs, outputs = _add_sub("float16")
