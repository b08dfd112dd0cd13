"""Server reflection that sends protoserve's proto comments along with its descriptors.

grpcio-reflection answers file requests from a ``DescriptorPool``, and a pool
never keeps ``source_code_info``: the compiled ``_pb2`` modules have none, and
``DescriptorPool.Add`` drops it from protos that do. So clients (the gateway's
``--from-reflection``, ``buf curl``, grpcurl) got the schema without a word of
documentation. The package ships ``descriptor_set.binpb`` (built with
``--include_source_info``); :func:`enable_reflection` registers grpcio-reflection's
own servicer with :class:`_SourceInfoPool`, a thin wrapper around the default
pool that hands out those richer ``FileDescriptorProto`` for the files it has.

What the servicer (``grpc_reflection/v1alpha/_base.py``, 1.85) needs of its pool:

- ``FindFileByName(name)`` for ``file_by_filename``;
- ``FindFileContainingSymbol(symbol)`` for ``file_containing_symbol``, and for
  ``file_containing_extension`` after the next two;
- ``FindMessageTypeByName``, ``FindExtensionByNumber``, ``FindAllExtensions``
  for the extension requests, whose results it only reads numbers and names from;
- a ``KeyError`` from any of them when the thing is unknown (it answers NOT_FOUND).

Of each file it gets back it reads ``.name`` and ``.dependencies`` (recursively,
to send the whole import closure) and calls ``.CopyToProto(proto)`` to serialize
it. :class:`_SourceFile` overrides exactly those, plus ``serialized_pb`` in case a
later grpcio-reflection serializes that way; anything else is passed through to
the default pool and its descriptors, so an unforeseen use degrades to the
plain (comment-less) answer rather than an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib.resources import files
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection

__all__ = ["enable_reflection"]

log = logging.getLogger(__name__)


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Add grpcio-reflection (``grpc.reflection.v1alpha``) to ``server``, with comments.

    Files in the shipped descriptor set are sent as that set has them, with
    ``source_code_info``; every other file (``google/api/annotations.proto``,
    ``google/protobuf/struct.proto``, the health protos, ...) comes from the
    default pool, as plain ``enable_server_reflection`` would send it. If the
    descriptor set is missing or unreadable, this is plain reflection (logged
    at debug); a file whose shipped proto disagrees with the compiled module is
    sent as compiled (logged as a warning: the package was built wrong). Never
    raises for the descriptor set's sake.

    Args:
        server: the server to add the reflection service to (before it starts).
        service_names: fully-qualified names that ``list_services`` reports.
    """
    pool = _SourceInfoPool(descriptor_pool.Default(), _shipped_files())
    # The stubs want a DescriptorPool; the servicer only duck-types it (module docstring).
    reflection.enable_server_reflection(
        service_names, server, pool=cast(descriptor_pool.DescriptorPool, pool)
    )


#: The packages that ship a ``descriptor_set.binpb`` of their own proto file.
_SHIPPED_PACKAGES = ("protoserve.inference.v1", "protoserve.openai.v1")


def _read_descriptor_set() -> bytes:
    """The ``FileDescriptorSet`` shipped in each of :data:`_SHIPPED_PACKAGES`, as one:
    serialized messages joined parse as one message, their repeated ``file`` joined."""
    return b"".join(
        (files(package) / "descriptor_set.binpb").read_bytes() for package in _SHIPPED_PACKAGES
    )


def _shipped_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """File name -> proto from the shipped descriptor set; empty if there is none to read."""
    try:
        data = _read_descriptor_set()
        parsed = descriptor_pb2.FileDescriptorSet.FromString(data)
    except (ImportError, OSError, DecodeError) as exc:
        log.debug("reflection without proto comments: no readable descriptor set (%s)", exc)
        return {}
    return {proto.name: proto for proto in parsed.file}


class _SourceInfoPool:
    """The default pool, except that files it has a shipped proto for carry comments.

    Lookups always go to ``pool``: which files and symbols exist, and the
    NOT_FOUND answers, are exactly the default pool's. Only the serialization
    of a found file changes, and only when the shipped proto describes the same
    schema as the compiled one (see :meth:`_override`).
    """

    def __init__(
        self,
        pool: descriptor_pool.DescriptorPool,
        shipped: dict[str, descriptor_pb2.FileDescriptorProto],
    ) -> None:
        self._pool = pool
        self._shipped = shipped
        # name -> the proto to send, or None for "send the pool's own"; decided on
        # first use, because a _pb2 module may reach the default pool after startup.
        self._checked: dict[str, descriptor_pb2.FileDescriptorProto | None] = {}

    def FindFileByName(self, file_name: str) -> _SourceFile:
        return _SourceFile(self._pool.FindFileByName(file_name), self)

    def FindFileContainingSymbol(self, symbol: str) -> _SourceFile:
        return _SourceFile(self._pool.FindFileContainingSymbol(symbol), self)

    def FindMessageTypeByName(self, full_name: str) -> Descriptor:
        return self._pool.FindMessageTypeByName(full_name)

    def FindExtensionByNumber(self, message_descriptor: Descriptor, number: int) -> FieldDescriptor:
        return self._pool.FindExtensionByNumber(message_descriptor, number)

    def FindAllExtensions(self, message_descriptor: Descriptor) -> list[FieldDescriptor]:
        return list(self._pool.FindAllExtensions(message_descriptor))

    def __getattr__(self, name: str) -> Any:
        # Any other pool method a future servicer calls: the default pool's answer.
        return getattr(self._pool, name)

    def _override(self, file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto | None:
        """The shipped proto to send for ``file``, or None to send the compiled one.

        A shipped proto that disagrees with the compiled module (a descriptor set
        left stale by a rebuild) is not used: clients must be told the schema the
        server actually decodes, comments or not.
        """
        if file.name in self._checked:
            return self._checked[file.name]
        proto = self._shipped.get(file.name)
        if proto is not None:
            compiled = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(compiled)
            if _schema(proto) != _schema(compiled):
                log.warning(
                    "reflection: shipped descriptor set disagrees with the compiled %s; "
                    "sending it without comments",
                    file.name,
                )
                proto = None
        self._checked[file.name] = proto
        return proto


class _SourceFile:
    """A ``FileDescriptor`` that serializes as the shipped proto when there is one.

    Provides what the servicer uses (``name``, ``dependencies``, ``CopyToProto``)
    and ``serialized_pb``; every other attribute is the wrapped descriptor's.
    """

    def __init__(self, file: FileDescriptor, pool: _SourceInfoPool) -> None:
        self._file = file
        self._pool = pool

    @property
    def name(self) -> str:
        return self._file.name

    @property
    def dependencies(self) -> list[_SourceFile]:
        # Wrapped too: the servicer walks these to send the closure, and a shipped
        # set may hold imported files as well as ours.
        return [_SourceFile(dependency, self._pool) for dependency in self._file.dependencies]

    @property
    def serialized_pb(self) -> bytes:
        proto = self._pool._override(self._file)
        return self._file.serialized_pb if proto is None else proto.SerializeToString()

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        """Fill ``proto`` (replacing its contents) with this file, comments included."""
        shipped = self._pool._override(self._file)
        if shipped is None:
            self._file.CopyToProto(proto)
        else:
            proto.CopyFrom(shipped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _schema(proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """``proto`` less what protoc's descriptor set adds to a compiled module's descriptor.

    That is ``source_code_info`` and every ``json_name`` equal to the default
    one (protoc fills them all in for ``--descriptor_set_out``; the Python
    plugin keeps only custom ones). Anything else that differs is a real
    schema difference.
    """
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(proto)
    copy.ClearField("source_code_info")
    _clear_default_json_names(copy.extension)
    for message in copy.message_type:
        _clear_message_json_names(message)
    return copy


def _clear_message_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    _clear_default_json_names(message.field)
    _clear_default_json_names(message.extension)
    for nested in message.nested_type:
        _clear_message_json_names(nested)


def _clear_default_json_names(fields: Sequence[descriptor_pb2.FieldDescriptorProto]) -> None:
    for field in fields:
        if field.json_name == _default_json_name(field.name):
            field.ClearField("json_name")


def _default_json_name(name: str) -> str:
    """protoc's ``ToJsonName``: drop each ``_`` and upper-case the letter after it."""
    out: list[str] = []
    upper_next = False
    for char in name:
        if char == "_":
            upper_next = True
        else:
            out.append(char.upper() if upper_next else char)
            upper_next = False
    return "".join(out)
