"""``protoserve serve``: run the gRPC inference server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from protoserve.common import workers
from protoserve.common.logs import configure as configure_logging
from protoserve.server.app import InferenceServer
from protoserve.server.auth import Auth, TokenFileError
from protoserve.server.config import ServerConfig, add_arguments, from_arguments
from protoserve.server.runtime.devices import (
    DEVICE_FORMS,
    DeviceError,
    check_device,
    place,
    resolve_device,
)
from protoserve.server.runtime.loader import ModelSpecError, load_model_spec
from protoserve.server.tls import TLSFileError, server_credentials

__all__ = ["build_parser", "main"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="protoserve serve")
    parser.description = (
        "Serve models over gRPC (InferenceService, the Open Inference Protocol, health, "
        "reflection): models named with --model, and every model of a --model-repository. "
        "Every flag can also be set by its PROTOSERVE_* environment variable."
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    config = from_arguments(args)
    if config.workers < 1:
        parser.error(f"--workers must be 1 or more, not {config.workers}")
    if config.instances < 1:
        parser.error(f"--instances must be 1 or more, not {config.instances}")
    if config.max_connection_age is not None and config.max_connection_age <= 0:
        parser.error(f"--max-connection-age must be above 0, not {config.max_connection_age:g}")
    if config.max_connection_age_grace is not None:
        if config.max_connection_age is None:
            parser.error("--max-connection-age-grace needs --max-connection-age")
        if config.max_connection_age_grace < 0:
            parser.error(
                "--max-connection-age-grace must be 0 or more, "
                f"not {config.max_connection_age_grace:g}"
            )
    try:
        check_device(config.device)
    except DeviceError:
        parser.error(f"--device: {config.device!r} is not one of {DEVICE_FORMS}")
    configure_logging(config.log_level, config.log_format)
    try:
        # A bad TLS or token file: one line before any model loads.
        server_credentials(config)
        auth = Auth.from_config(config)
    except (TLSFileError, TokenFileError) as exc:
        _fail(config.log_format, exc)
        return 2
    repository = config.model_repository
    if repository is not None and not Path(repository).is_dir():
        # The whole repository missing is a mistake in the command, not a broken model.
        _fail(config.log_format, ValueError(f"model repository {repository!r} is not a folder"))
        return 2
    try:
        # A device this machine lacks: one line before any model loads (a repository
        # model's own device is checked as it loads, and fails that model alone).
        resolve_device(config.device)
    except DeviceError as exc:
        _fail(config.log_format, exc)
        return 2
    if config.workers > 1:  # the workers load the models, each its own copy
        return _supervise(config, argv)
    try:
        models = [load_model_spec(spec) for spec in config.models]
        for name, model in models:
            try:
                place(model, config.device, config.dtype)
            except DeviceError as exc:
                raise DeviceError(f"model {name}: {exc}") from exc
    except (ModelSpecError, DeviceError) as exc:
        _fail(config.log_format, exc)
        return 2

    async def serve() -> None:
        # Built inside the running loop: a grpc.aio server belongs to the loop it is made in.
        await InferenceServer(config, models, auth=auth).serve_until_signal()

    try:
        asyncio.run(serve())
    except OSError as exc:
        _fail(config.log_format, exc)
        return 1
    return 0


def _supervise(config: ServerConfig, argv: Sequence[str]) -> int:
    """``--workers N``: N servers on one port, each with its own models (common/workers.py).

    Worker ``i`` serves metrics on ``--metrics-port`` + ``i`` (each on a free port of its
    own with 0): one registry per process, so Prometheus scrapes each worker.
    """

    def metrics_port(index: int) -> list[str]:
        if config.metrics_port is None:
            return []
        return [f"--metrics-port={config.metrics_port + index if config.metrics_port else 0}"]

    plan = workers.Plan(
        command="serve",
        argv=argv,
        host=config.host,
        port=config.port,
        workers=config.workers,
        port_file=config.port_file,
        worker_args=metrics_port,
        siblings=True,
    )
    try:
        return workers.supervise(plan)
    except OSError as exc:
        _fail(config.log_format, exc)
        return 1


def _fail(log_format: str, error: Exception) -> None:
    """Report why the server cannot run: one plain line, or a JSON one in a JSON log."""
    if log_format == "json":
        logging.getLogger("protoserve.server").error("%s", error)
    else:
        print(f"protoserve serve: {error}", file=sys.stderr)
