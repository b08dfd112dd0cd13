"""An MLServer custom runtime serving the benchmark's TorchScript MLP (bench/_model.py).

The idiomatic MLServer way (its docs, "Custom Inference Runtimes"): a subclass
of ``mlserver.MLModel`` named by ``implementation`` in ``model-settings.json``,
whose ``load`` reads the file at ``parameters.uri`` and whose ``predict`` turns
the V2 request into numpy with ``NumpyCodec`` and back. MLServer itself serves
the Open Inference Protocol over REST and gRPC, runs ``predict`` in its worker
process(es) (``parallel_workers``) and does the adaptive batching
(``max_batch_size`` / ``max_batch_time``) before it.

It runs under MLServer's own virtualenv (bench/_peers.py makes it) and imports
nothing from protoserve. ``bench/_peers.py`` writes the settings files and
starts ``mlserver start DIR`` with this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

INPUT = "INPUT0"
OUTPUT = "OUTPUT0"
FEATURES = 64


class TorchScriptMLP(MLModel):
    """FP32 ``INPUT0 [batch, 64]`` in, FP32 ``OUTPUT0 [batch, 64]`` out."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        self._module = torch.jit.load(path, map_location="cpu")
        self._module.eval()
        # The metadata is what model-settings.json declares; declare it here when it
        # does not, so /v2/models/NAME always describes the tensors (MLModel's docs
        # allow setting inputs/outputs at load time).
        if not self.inputs:
            self.inputs = [MetadataTensor(name=INPUT, datatype="FP32", shape=[-1, FEATURES])]
        if not self.outputs:
            self.outputs = [MetadataTensor(name=OUTPUT, datatype="FP32", shape=[-1, FEATURES])]
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
