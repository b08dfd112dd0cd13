"""The public gateway: the generic core with protoserve's own pieces registered.

``build_app`` (``gateway/_app.py``) serves any descriptors and names no service
(docs/architecture.md, rule 3). :func:`build_gateway`, what ``protoserve gateway``
and users call, is that core plus ``gateway/inference/``: protoserve's compiled-in
API by default, the Open Inference Protocol's codec and the playground where their
services are served, and the codec name ``oip``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Unpack

import grpc
from starlette.applications import Starlette

from protoserve.gateway._app import DEFAULT_TITLE, AppOptions, build_app
from protoserve.gateway._codecs import Codec
from protoserve.gateway._codecs import load_codec as _load_codec
from protoserve.gateway._codecs import parse_codec_option as _parse_codec_option
from protoserve.gateway._descriptors import Descriptors
from protoserve.gateway.inference import NAMED_CODECS, from_compiled, register

__all__ = ["build_gateway", "load_codec", "parse_codec_option"]


def build_gateway(
    upstream: str | grpc.aio.Channel,
    *,
    descriptors: Descriptors | None = None,
    playground: bool | None = None,
    codecs: Mapping[str, Codec | None] | None = None,
    **options: Unpack[AppOptions],
) -> Starlette:
    """A Starlette app serving every method of ``descriptors`` over HTTP, calling ``upstream``.

    Args:
        upstream: a gRPC target (``host:port``, ``dns:///name:port``,
            ``ipv4:a:p,b:q``; a channel is opened at startup, balanced over its
            servers), or an open ``grpc.aio.Channel``.
        descriptors: what to serve; protoserve's own API (compiled in) by default.
        playground: serve the text-generation playground page at ``/``; by default
            only when ``descriptors`` include ``protoserve.inference.v1.InferenceService``.
        codecs: full method or service name -> the :class:`Codec` of its HTTP format, or
            None for protobuf's JSON mapping (see ``docs/gateway-codecs.md``). The Open
            Inference Protocol's codec is registered for ``inference.GRPCInferenceService``
            and OpenAI's for ``protoserve.openai.v1.OpenAIService``, unless this names
            that service.
        options: ``cors_origins``, ``max_body_bytes``, ``keepalive``,
            ``forwarded_headers``, ``use_proto_names``, ``max_message_bytes``, ``title``,
            ``channel_credentials`` (TLS to the upstream), ``upstream_retries``,
            ``upstream_health_check``: as ``build_app``
            (``gateway/_app.py``) documents them.
            ``docs`` and ``metrics`` (False turns those pages off) too.

    Raises:
        ValueError: a method's ``google.api.http`` rule is invalid; a codec is
            registered for a name not served, or for a streaming method when it does not
            set ``serves_streams``; or a page's path is one of the gateway's own.
    """
    descriptors = descriptors or from_compiled()
    title = options.get("title", DEFAULT_TITLE)
    wanted, pages = register(descriptors, codecs or {}, playground=playground, title=title)
    return build_app(upstream, descriptors, codecs=wanted, pages=pages, **options)


def load_codec(spec: str) -> Codec | None:
    """The codec ``spec`` names: ``protobuf`` (None: no codec), ``oip``, or ``package.module:attr``.

    The attribute is a :class:`Codec` instance, or a class or function that makes
    one when called with no arguments.

    Raises:
        ValueError: the module or attribute cannot be found, or is not a codec.
    """
    return _load_codec(spec, NAMED_CODECS)


def parse_codec_option(option: str) -> tuple[str, Codec | None]:
    """``NAME=SPEC`` (the CLI's ``--codec``) as (name, codec); see :func:`load_codec`.

    Raises:
        ValueError: no ``=``, an empty name, or a spec ``load_codec`` refuses.
    """
    return _parse_codec_option(option, NAMED_CODECS)
