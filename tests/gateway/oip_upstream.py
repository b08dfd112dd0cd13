"""A small Open Inference Protocol server for the gateway's OIP tests: real gRPC, checkable answers.

``inference.GRPCInferenceService`` from the compiled stubs, with server
reflection, on a port-0 grpc.aio server. What it does is easy to check from
outside:

- model ``doubler`` (version "1") answers, for every input ``X``, an output
  ``OUT_X`` of the same datatype and shape: numbers doubled (integers wrap),
  BOOL unchanged, BYTES upper-cased. Outputs go as ``raw_output_contents``,
  or as typed ``contents`` when the request parameter ``typed_contents`` is
  true (as other OIP servers answer). Request parameters come back as response
  parameters, each requested output's parameters as that output's. With
  ``outputs`` in the request, only those are answered. The request parameter
  ``fail`` (a gRPC code name) makes the call fail with that code.
- model ``cold`` exists but is not ready; any other model is NOT_FOUND.
- :class:`State` holds the server's liveness and readiness (tests switch them)
  and the last request of each kind (tests read what the gateway sent).

Run as a process: ``python -m tests.gateway.oip_upstream PORT_FILE``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_reflection.v1alpha import reflection

from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc

SERVICE = "inference.GRPCInferenceService"
_NUMPY = {
    "BOOL": "|b1",
    "UINT8": "|u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "|i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BF16": "<u2",
}
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass
class State:
    """What tests switch and read."""

    live: bool = True
    ready: bool = True
    infer_requests: list[pb.ModelInferRequest] = field(default_factory=list)
    loads: list[pb.RepositoryModelLoadRequest] = field(default_factory=list)
    unloads: list[pb.RepositoryModelUnloadRequest] = field(default_factory=list)


def split_bytes(raw: bytes) -> list[bytes]:
    """BYTES raw contents (4-byte little-endian length, then the bytes) as elements."""
    items, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def join_bytes(items: list[bytes]) -> bytes:
    """Elements as BYTES raw contents."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def doubled(datatype: str, raw: bytes) -> bytes:
    """The doubler's output bytes for an input's bytes."""
    if datatype == "BYTES":
        return join_bytes([item.upper() for item in split_bytes(raw)])
    values = np.frombuffer(raw, dtype=_NUMPY[datatype])
    if datatype == "BOOL":
        return values.tobytes()
    if datatype == "BF16":
        # Doubling a bfloat16 only raises its exponent: exact through FP32.
        wide = (values.astype("<u4") << 16).view("<f4") * 2
        return (wide.view("<u4") >> 16).astype("<u2").tobytes()
    with np.errstate(over="ignore"):
        return (values * values.dtype.type(2)).astype(values.dtype).tobytes()


def _typed(datatype: str, raw: bytes, contents: pb.InferTensorContents) -> None:
    name = _CONTENTS[datatype]
    if datatype == "BYTES":
        getattr(contents, name).extend(split_bytes(raw))
    else:
        getattr(contents, name).extend(np.frombuffer(raw, dtype=_NUMPY[datatype]).tolist())


def _parameter_value(parameter: pb.InferParameter) -> Any:
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The test server's behaviour (see the module docstring)."""

    def __init__(self, state: State) -> None:
        self.state = state

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.state.live)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.state.ready)

    async def _model(self, name: str, context: Any) -> None:
        if name not in ("doubler", "cold"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{name}' is not found")

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._model(request.name, context)
        return pb.ModelReadyResponse(ready=request.name == "doubler")

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name="oip-test", version="0.1", extensions=["model_repository"]
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._model(request.name, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="pytorch_libtorch",
            inputs=[tensor(name="INPUT0", datatype="FP32", shape=[-1, 4])],
            outputs=[tensor(name="OUT_INPUT0", datatype="FP32", shape=[-1, 4])],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        await self._model(request.name, context)
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=request.name,
                platform="pytorch_libtorch",
                max_batch_size=8,
                input=[pb.ModelInput(name="INPUT0", data_type=pb.TYPE_FP32, dims=[4])],
                output=[pb.ModelOutput(name="OUT_INPUT0", data_type=pb.TYPE_FP32, dims=[4])],
                dynamic_batching=pb.ModelDynamicBatching(
                    preferred_batch_size=[4], max_queue_delay_microseconds=100
                ),
                backend="python",
            )
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        self.state.infer_requests.append(request)
        await self._model(request.model_name, context)
        if request.model_name == "cold":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model 'cold' is not ready")
        parameters = {k: _parameter_value(v) for k, v in request.parameters.items()}
        if "fail" in parameters:
            await context.abort(grpc.StatusCode[parameters["fail"]], "failing as asked")
        wanted = {o.name: o for o in request.outputs}
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        for key, value in request.parameters.items():
            response.parameters[key].CopyFrom(value)
        typed = parameters.get("typed_contents") is True
        for index, tensor in enumerate(request.inputs):
            name = f"OUT_{tensor.name}"
            if wanted and name not in wanted:
                continue
            raw = doubled(tensor.datatype, request.raw_input_contents[index])
            output = response.outputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
            if name in wanted:
                for key, value in wanted[name].parameters.items():
                    output.parameters[key].CopyFrom(value)
            if typed:
                _typed(tensor.datatype, raw, output.contents)
            else:
                response.raw_output_contents.append(raw)
        return response

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        index = pb.RepositoryIndexResponse.ModelIndex
        models = [index(name="doubler", version="1", state="READY")]
        if not request.ready:
            models.append(index(name="cold", state="UNAVAILABLE", reason="not loaded"))
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        self.state.loads.append(request)
        await self._model(request.model_name, context)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        self.state.unloads.append(request)
        await self._model(request.model_name, context)
        return pb.RepositoryModelUnloadResponse()


async def start(state: State) -> tuple[grpc.aio.Server, int]:
    """The server, started on 127.0.0.1 port 0; returns it and its port."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(state), server)
    reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _main(port_file: Path) -> None:
    server, port = await start(State())
    await asyncio.to_thread(port_file.write_text, f"{port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(_main(Path(sys.argv[1])))
