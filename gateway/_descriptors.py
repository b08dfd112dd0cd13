"""Where the gateway's routes come from: a pool of descriptors and the services in it.

Sources, one result (:class:`Descriptors`):

- a ``FileDescriptorSet`` file (``protoc --include_imports --descriptor_set_out``),
  for any gRPC service whose protos you have;
- the upstream server's reflection service, for any gRPC server that has it;
- stubs compiled in: protoserve's own API (``from_compiled`` in
  ``gateway/inference/``, the public ``build_gateway``'s default).

Descriptor sets built with ``--include_source_info`` also give the proto
comments, which the OpenAPI document shows.

Every source gives a pool that is complete once built: reflection fetches every file
the services need at start-up, and its pool never goes back to the upstream, so the
gateway serves (and renders errors) the same whichever source it was given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protoserve.gateway._comments import comments_from_descriptor_set

__all__ = [
    "DescriptorSourceError",
    "Descriptors",
    "from_descriptor_set",
    "from_reflection",
]

#: Services never exposed over HTTP: they are about gRPC itself.
_SKIPPED = frozenset(
    {
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


class DescriptorSourceError(RuntimeError):
    """The descriptors could not be loaded; the message says from where and why."""


@dataclass(frozen=True)
class Descriptors:
    """The services to serve, the pool their messages live in, and their comments.

    Attributes:
        pool: resolves every message type the services use (and ``Any`` details).
        services: the services to serve, in a stable order.
        comments: full name -> leading proto comment, when the source had them.
        source: where they came from, for logs and the OpenAPI document.
    """

    pool: descriptor_pool.DescriptorPool
    services: tuple[ServiceDescriptor, ...]
    comments: dict[str, str] = field(default_factory=dict)
    source: str = ""


def _services(
    pool: descriptor_pool.DescriptorPool, names: Iterable[str], source: str
) -> tuple[ServiceDescriptor, ...]:
    found = []
    for name in sorted(set(names) - _SKIPPED):
        try:
            found.append(pool.FindServiceByName(name))
        except KeyError as exc:
            raise DescriptorSourceError(f"{source}: no service {name!r}") from exc
    if not found:
        raise DescriptorSourceError(f"{source}: no services to serve")
    return tuple(found)


def _comments(files: Sequence[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    data = descriptor_pb2.FileDescriptorSet(file=files).SerializeToString()
    return comments_from_descriptor_set(data)


def from_descriptor_set(
    data: bytes, *, source: str = "descriptor set", services: Sequence[str] = ()
) -> Descriptors:
    """Every service in a serialized ``FileDescriptorSet`` (or only ``services``).

    Raises:
        DescriptorSourceError: the bytes are not a descriptor set, a file's imports
            are missing (build it with ``--include_imports``), or a named service is absent.
    """
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    except Exception as exc:  # DecodeError, and upb's variants of it
        raise DescriptorSourceError(f"{source}: not a FileDescriptorSet ({exc})") from exc
    pool = descriptor_pool.DescriptorPool()
    try:
        for proto in files:
            pool.Add(proto)
    except (TypeError, KeyError) as exc:
        raise DescriptorSourceError(
            f"{source}: {exc} (was it built with --include_imports?)"
        ) from exc
    names = services or [
        f"{f.package}.{s.name}" if f.package else s.name for f in files for s in f.service
    ]
    has_source_info = any(f.HasField("source_code_info") for f in files)
    return Descriptors(
        pool, _services(pool, names, source), _comments(files) if has_source_info else {}, source
    )


def from_reflection(
    target: str,
    *,
    services: Sequence[str] = (),
    timeout: float = 10.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> Descriptors:
    """The services an upstream server lists through server reflection.

    Raises:
        DescriptorSourceError: the upstream is unreachable, or has no reflection service.
    """
    source = f"reflection at {target}"
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            raise DescriptorSourceError(f"{source}: unreachable after {timeout:g}s") from exc
        database = ProtoReflectionDescriptorDatabase(channel)
        try:
            names = services or database.get_services()
            # Fetches lazily, over the channel: used only to find the files needed.
            fetching = descriptor_pool.DescriptorPool(database)
            found = _services(fetching, names, source)
        except grpc.RpcError as exc:
            raise DescriptorSourceError(
                f"{source}: {exc.code().name}: {exc.details()} (does the server enable reflection?)"
            ) from exc
        # Files as the server sent them (the pool's own copies drop source_code_info),
        # every one the services need, fetched now while the channel is open.
        files = [database.FindFileByName(name) for name in _file_names(found)]
        has_source_info = any(f.HasField("source_code_info") for f in files)
    finally:
        channel.close()
    # The database-backed pool would go back to the (closed) channel for any name it has
    # not seen, from inside error rendering or JSON parsing: serve a pool of its own,
    # complete from the start, as a descriptor-set file gives.
    pool = _standalone_pool(files, source)
    found = _services(pool, [service.full_name for service in found], source)
    return Descriptors(pool, found, _comments(files) if has_source_info else {}, source)


def _standalone_pool(
    files: Sequence[descriptor_pb2.FileDescriptorProto], source: str
) -> descriptor_pool.DescriptorPool:
    """A pool of ``files`` (dependencies first) and google.rpc's detail types, which
    needs nothing else after it is built."""
    pool = descriptor_pool.DescriptorPool()
    try:
        for proto in files:
            pool.Add(proto)
    except (TypeError, KeyError) as exc:
        raise DescriptorSourceError(f"{source}: {exc}") from exc
    names = {proto.name for proto in files}
    for extra in _error_detail_files():
        if extra.name not in names:
            try:
                pool.Add(extra)
            except (TypeError, KeyError):
                # The upstream defines these names in a file of its own: its win.
                break
    return pool


def _error_detail_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """google/rpc/error_details.proto and what it imports, dependencies first."""
    from google.rpc import error_details_pb2

    seen: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def visit(file: Any) -> None:
        if file.name not in seen:
            for dependency in file.dependencies:
                visit(dependency)
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            seen[file.name] = proto

    visit(error_details_pb2.DESCRIPTOR)
    return list(seen.values())


def _file_names(services: Sequence[ServiceDescriptor]) -> list[str]:
    """Names of the files defining ``services`` and all they import, dependencies first."""
    seen: dict[str, None] = {}

    def visit(file: Any) -> None:
        if file.name not in seen:
            for dependency in file.dependencies:
                visit(dependency)
            seen[file.name] = None

    for service in services:
        visit(service.file)
    return list(seen)
