"""The tensors the compatibility tests send, and the answers a correct server gives."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Elements per row of the add/sub models (tests/compat/models.py).
WIDTH = 16


@dataclass(frozen=True)
class AddSubCase:
    """One add/sub model: its name, the protocol's datatype and numpy's."""

    model: str
    datatype: str
    dtype: type[np.generic]

    def operands(self, rows: int = 2) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]:
        """Two [rows, 16] operands whose sum and difference are exact in the dtype."""
        steps = np.arange(rows * WIDTH).reshape(rows, WIDTH)
        if self.dtype is np.int64:
            # Above 2**53: a value that went through a double on the way comes back changed.
            return (2**60 + steps).astype(np.int64), (2**59 + 7 * steps).astype(np.int64)
        # Halves and quarters of small numbers: exact in FP16 as in FP32.
        return (steps * 0.5).astype(self.dtype), (0.25 - steps).astype(self.dtype)


CASES = (
    AddSubCase("add_sub_fp32", "FP32", np.float32),
    AddSubCase("add_sub_int64", "INT64", np.int64),
    AddSubCase("add_sub_fp16", "FP16", np.float16),
)
#: A model of the repository that the load/unload tests take down and bring back.
SPARE = "spare_fp32"
#: The built-in text model (generation and embedding).
TEXT = "bytelm"
