"""The three places a gateway learns protoserve's API from, for tests that run on each.

docs/architecture.md, rule 3: given any descriptors (compiled in, a descriptor-set
file, or the upstream's reflection), the gateway serves every method it finds, and
serves it the same way. The error, routing and transcoding tests run against a
gateway built from each source, in front of the same upstream.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path

from protoserve.gateway import Descriptors, from_descriptor_set, from_reflection
from protoserve.gateway.inference import (
    INFERENCE_SERVICE,
    OIP_SERVICE,
    OPENAI_SERVICE,
    from_compiled,
)

#: Each source a gateway's descriptors can come from, as the test ids name them.
SOURCES = ("compiled", "descriptor-set", "reflection")

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"


@functools.cache
def protoserve_descriptor_set() -> bytes:
    """protoserve's protos as a user builds them for ``--descriptor-set``:
    ``protoc --include_imports --include_source_info --descriptor_set_out``."""
    import google.api.annotations_pb2 as annotations

    googleapis = Path(annotations.__file__).resolve().parents[2]
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "protoserve.binpb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"-I{googleapis}",
             "--include_imports", "--include_source_info", f"--descriptor_set_out={out}",
             *protos],
            check=True,
        )  # fmt: skip
        return out.read_bytes()


def descriptors_for(source: str, target: str) -> Descriptors:
    """protoserve's three services (the task API, the Open Inference Protocol and
    OpenAI's API) from ``source``, one of :data:`SOURCES`; ``target`` is the upstream,
    for reflection."""
    services = (INFERENCE_SERVICE, OIP_SERVICE, OPENAI_SERVICE)
    if source == "compiled":
        return from_compiled()
    if source == "descriptor-set":
        return from_descriptor_set(
            protoserve_descriptor_set(), source="protoserve.binpb", services=services
        )
    if source == "reflection":
        # The services the compiled-in gateway serves, so that the three serve the same
        # routes (the server's reflection lists grpc.health.v1.Health too).
        return from_reflection(target, services=services)
    raise ValueError(f"no descriptor source {source!r}; one of {SOURCES}")
