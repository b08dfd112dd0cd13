"""An MLServer custom runtime serving the benchmark's TorchScript MLP (bench/_model.py).

The idiomatic MLServer way (its docs, "Custom Inference Runtimes"): an ``MLModel`` named by
``implementation`` in ``model-settings.json``; MLServer serves the Open Inference Protocol
over REST and gRPC, runs ``predict`` in its worker process(es) and batches adaptively
before it. Run under MLServer's own virtualenv (bench/_peers.py writes the settings and
starts ``mlserver start DIR`` with this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

INPUT = "INPUT0"
OUTPUT = "OUTPUT0"
FEATURES = 64


class TorchScriptMLP(MLModel):
    """FP32 ``INPUT0 [batch, 64]`` in, FP32 ``OUTPUT0 [batch, 64]`` out."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        self._module = torch.jit.load(path, map_location="cpu")
        self._module.eval()  # its tensors: as model-settings.json declares them
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = next((i for i in payload.inputs if i.name == INPUT), payload.inputs[0])
        # astype copies: the decoded array may be a read-only view of the request's bytes.
        rows = NumpyCodec.decode_input(request_input).astype(np.float32)
        with torch.inference_mode():
            result = self._module(torch.from_numpy(rows.reshape(-1, FEATURES))).numpy()
        # MLServer sets the response id from the request's.
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name=OUTPUT, payload=result)],
        )
