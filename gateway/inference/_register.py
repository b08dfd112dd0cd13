"""protoserve's own pieces of the gateway, and the one place that registers them.

The gateway core serves any gRPC service and names none of ours
(docs/architecture.md, rule 3). What protoserve's API gets on top is decided here,
and the public ``build_gateway`` (``gateway/_assembly.py``) registers it:

- :func:`from_compiled`, protoserve's descriptors compiled into this package: what
  ``build_gateway`` and ``protoserve gateway`` serve unless told otherwise;
- the Open Inference Protocol's codec (``gateway/inference/_oip.py``), for
  ``inference.GRPCInferenceService`` whenever it is served, and by the name ``oip``
  for ``--codec``;
- OpenAI's codec (``gateway/inference/_openai.py``), for
  ``protoserve.openai.v1.OpenAIService`` whenever it is served, and by the name
  ``openai`` for ``--codec``;
- the text-generation playground at ``/`` (``_playground.py``), when
  ``protoserve.inference.v1.InferenceService`` is served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.resources import files
from types import MappingProxyType

from google.protobuf import descriptor_pool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from protoserve.gateway._app import Endpoint
from protoserve.gateway._codecs import Codec, NamedCodecs
from protoserve.gateway._comments import comments_from_descriptor_set
from protoserve.gateway._descriptors import Descriptors
from protoserve.gateway.inference._playground import playground_html

__all__ = [
    "INFERENCE_SERVICE",
    "NAMED_CODECS",
    "OIP_SERVICE",
    "OPENAI_SERVICE",
    "from_compiled",
    "oip_codec",
    "openai_codec",
    "register",
]

#: protoserve's task API, which gets the playground.
INFERENCE_SERVICE = "protoserve.inference.v1.InferenceService"
#: The Open Inference Protocol's service, which gets the OIP codec unless told otherwise.
OIP_SERVICE = "inference.GRPCInferenceService"
#: OpenAI's API as a gRPC service, which gets the OpenAI codec unless told otherwise.
OPENAI_SERVICE = "protoserve.openai.v1.OpenAIService"


def oip_codec() -> Codec:
    """The Open Inference Protocol's REST format (KServe V2), as a codec."""
    # Imported only when needed: the OIP codec brings numpy.
    from protoserve.gateway.inference._oip import OipCodec

    return OipCodec()


def openai_codec() -> Codec:
    """OpenAI's HTTP API (its JSON, ``data: [DONE]`` streams and errors), as a codec."""
    from protoserve.gateway.inference._openai import OpenAICodec

    return OpenAICodec()


#: The codec names ``--codec`` knows besides ``protobuf``.
NAMED_CODECS: NamedCodecs = MappingProxyType({"oip": oip_codec, "openai": openai_codec})
#: Each service of ours that has a codec -> what makes it.
_SERVICE_CODECS: Mapping[str, Callable[[], Codec]] = MappingProxyType(
    {OIP_SERVICE: oip_codec, OPENAI_SERVICE: openai_codec}
)


def from_compiled() -> Descriptors:
    """protoserve's own API, from the stubs in this package: the task API
    (``protoserve.inference.v1.InferenceService``), the Open Inference Protocol
    (``inference.GRPCInferenceService``, served with the OIP codec) and OpenAI's API
    (``protoserve.openai.v1.OpenAIService``, served with the OpenAI codec); comments
    from the task API's and OpenAI's shipped descriptor sets."""
    from protoserve.inference.v1 import inference_service_pb2 as pb
    from protoserve.oip.v2 import grpc_service_pb2 as oip
    from protoserve.openai.v1 import openai_service_pb2 as openai

    services = (
        pb.DESCRIPTOR.services_by_name["InferenceService"],
        oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        openai.DESCRIPTOR.services_by_name["OpenAIService"],
    )
    # Only our own packages' comments: they are what the server's reflection sends too,
    # so the compiled-in and the reflected documents say the same.
    comments: dict[str, str] = {}
    for package in ("protoserve.inference.v1", "protoserve.openai.v1"):
        try:
            shipped = files(package) / "descriptor_set.binpb"
            if shipped.is_file():
                comments.update(comments_from_descriptor_set(shipped.read_bytes()))
        except (ModuleNotFoundError, OSError):
            continue
    return Descriptors(descriptor_pool.Default(), services, comments, "compiled-in stubs")


def register(
    descriptors: Descriptors,
    codecs: Mapping[str, Codec | None],
    *,
    playground: bool | None,
    title: str,
) -> tuple[dict[str, Codec | None], dict[str, Endpoint]]:
    """The codecs and pages of a gateway serving ``descriptors``, with protoserve's added.

    Args:
        descriptors: what the gateway serves.
        codecs: the codecs asked for; an entry for ``inference.GRPCInferenceService``
            or ``protoserve.openai.v1.OpenAIService`` (None included) keeps its own
            codec off it.
        playground: serve the playground at ``/``; None: when ``descriptors`` include
            ``protoserve.inference.v1.InferenceService``.
        title: the playground's title.

    Returns:
        ``codecs`` with our services' codecs added where they apply, and the pages to add.
    """
    served = {service.full_name for service in descriptors.services}
    wanted = dict(codecs)
    for service, make in _SERVICE_CODECS.items():
        if service in served and service not in wanted:
            wanted[service] = make()
    pages: dict[str, Endpoint] = {}
    if playground if playground is not None else INFERENCE_SERVICE in served:
        pages["/"] = _html(playground_html(title))
    return wanted, pages


def _html(page: str) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return HTMLResponse(page)

    return endpoint
