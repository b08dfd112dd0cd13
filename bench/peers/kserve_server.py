"""KServe's model server serving the benchmark's TorchScript MLP (bench/_model.py).

The idiomatic KServe custom model (its docs, "Deploy Custom Python Serving Runtime with
InferenceService", V2 protocol), serving the Open Inference Protocol over REST and gRPC
from one process, with no adaptive batching of its own (in a cluster that is the batcher
sidecar's job). Run under KServe's own virtualenv (bench/_peers.py makes it and starts
it); every ``kserve.model_server`` flag is accepted too.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.utils.utils import generate_uuid

INPUT = "INPUT0"
OUTPUT = "OUTPUT0"
FEATURES = 64


class TorchScriptMLP(Model):
    """FP32 ``INPUT0 [batch, 64]`` in, FP32 ``OUTPUT0 [batch, 64]`` out."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.module: Any = None
        self.load()

    def load(self) -> bool:
        self.module = torch.jit.load(self.path, map_location="cpu")
        self.module.eval()
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": INPUT, "datatype": "FP32", "shape": [-1, FEATURES]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, FEATURES]}]

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> InferResponse:  # fmt: skip
        request_input = payload.get_input_by_name(INPUT) or payload.inputs[0]
        # astype copies: as_numpy may be a read-only view of the request's bytes.
        rows = request_input.as_numpy().astype(np.float32).reshape(-1, FEATURES)
        with torch.inference_mode():
            result = self.module(torch.from_numpy(rows)).numpy()
        output = InferOutput(name=OUTPUT, shape=list(result.shape), datatype="FP32")
        # Raw bytes when the client sent raw inputs over gRPC or asked for binary
        # outputs over REST; numbers otherwise. (``InferOutput(data=ndarray)`` would
        # leave the choice to KServe, but its to_grpc() then fails on raw requests:
        # "The truth value of an array with more than one element is ambiguous".)
        output.set_data_from_numpy(result, binary_data=payload.use_binary_outputs)
        return InferResponse(response_id=payload.id or generate_uuid(), model_name=self.name,
                             infer_outputs=[output], use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True, help="the TorchScript file")
    args, _ = parser.parse_known_args()
    model = TorchScriptMLP(args.model_name, args.model_path)
    ModelServer().start([model])


if __name__ == "__main__":
    main()
