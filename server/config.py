"""Server settings: flags, each with a ``PROTOSERVE_*`` environment variable behind it.

A flag beats its environment variable, which beats the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

__all__ = ["ServerConfig", "add_arguments", "from_arguments"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``protoserve serve`` can be told."""

    #: Address to listen on; ``0.0.0.0`` or ``[::]`` to serve other machines.
    host: str = "127.0.0.1"
    #: Port to listen on; 0 picks a free one (see ``port_file``).
    port: int = 50051
    #: Server processes sharing ``port`` (SO_REUSEPORT), each with its own copy of the
    #: models; more than 1 runs a supervisor that starts them (common/workers.py).
    workers: int = 1
    #: Set by that supervisor (``PROTOSERVE_WORKER_INDEX``): this process is its worker
    #: number ``worker_index`` and binds ``port`` with SO_REUSEPORT. None: a lone server,
    #: which a second one on its port makes fail.
    worker_index: int | None = None
    #: TLS: the server's certificate chain (PEM); with ``keyfile``, gRPC is served
    #: over TLS only. None: plaintext.
    certfile: str | None = None
    #: TLS: the private key of ``certfile`` (unencrypted PEM).
    keyfile: str | None = None
    #: mTLS: CA certificates (PEM) that client certificates must be signed by; a
    #: client without one is refused in the handshake. Needs ``certfile``.
    client_ca: str | None = None
    #: Model specs (see ``protoserve.server.runtime.loader``); none by default when
    #: a model repository is given.
    models: tuple[str, ...] = ("bytelm",)
    #: A folder of model folders, each a ``model.toml`` and numbered versions
    #: (``docs/model-repository.md``); None: no repository.
    model_repository: str | None = None
    #: Let clients load and unload models of the repository while the server runs
    #: (RepositoryModelLoad/Unload). None (the default): only callers with an admin
    #: token may, so without ``admin_token_file`` nobody; True: also without an
    #: admin token configured (for local use: then any caller the server accepts
    #: may); False: nobody. Refused calls answer FAILED_PRECONDITION.
    model_control: bool | None = None
    #: A file of bearer tokens, one a line, that every call needs (but health, and
    #: reflection when public); None: calls need no token (docs/security.md).
    auth_token_file: str | None = None
    #: A file of admin bearer tokens, one a line: the only tokens that may load and
    #: unload models; they may make every other call too. None: no admin tokens.
    admin_token_file: str | None = None
    #: Health (grpc.health.v1's Check and Watch, and the Open Inference Protocol's
    #: ServerLive and ServerReady) answers without a token, for probes and load balancers.
    public_health: bool = True
    #: Server reflection answers without a token (it tells the schema, not the models).
    public_reflection: bool = False
    #: Largest request message accepted, in bytes.
    max_receive_message_bytes: int = 16 * MiB
    #: Largest response message sent, in bytes.
    max_send_message_bytes: int = 16 * MiB
    # gRPC transport limits (server/transport.py, docs/adr/0017).
    #: Seconds a unary-request call gets to send its one message and end its stream;
    #: past it, DEADLINE_EXCEEDED. No message or a second one: INVALID_ARGUMENT.
    request_read_timeout: float = 30.0
    #: Concurrent HTTP/2 streams (calls) on one connection; more are refused
    #: (REFUSED_STREAM). The gateway multiplexes every call over one connection:
    #: keep this above ``max_streams`` plus the unary calls it has in flight.
    max_streams_per_connection: int = 512
    #: Seconds a connection may be quiet before the server pings it.
    keepalive_time: float = 300.0
    #: Seconds the server waits for its ping's ack before closing the connection.
    keepalive_timeout: float = 20.0
    #: Seconds a client's pings must be apart while no data flows; closer is a strike.
    keepalive_min_ping_interval: float = 300.0
    #: Strikes a connection may have; one more and it gets GOAWAY ENHANCE_YOUR_CALM.
    keepalive_max_ping_strikes: int = 2
    #: Accept client pings on a connection with no calls (off: each is a strike).
    keepalive_permit_without_calls: bool = False
    #: Seconds a connection may live; then it gets GOAWAY and its client connects
    #: again, resolving the server's name anew (so that clients spread over servers
    #: added since). None: connections live as long as their clients keep them.
    max_connection_age: float | None = None
    #: Seconds the calls in flight on a connection that reached its age get to end
    #: before it closes; None: as long as they take.
    max_connection_age_grace: float | None = None
    #: Copies of each model run at once, each with its own worker thread (a model's
    #: own ``instances`` wins): for small models on a machine with cores to spare.
    instances: int = 1
    #: Seconds that calls in flight get to finish after SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    #: Per model, most requests waiting to run; more get RESOURCE_EXHAUSTED.
    max_queue: int = 64
    #: Per model, most requests run at once: generations decoded together in one
    #: batch (continuous batching), or taking turns a step at a time.
    max_active: int = 32
    #: Batch requests together: Embed/Predict requests that arrive together run as
    #: one model call, generations decode together. Off: one request per model call.
    batching: bool = True
    #: Generations decoded together get, bit for bit, the tokens each gets alone
    #: (batch invariance); off: to float rounding, which is faster. A model that
    #: cannot promise it on this machine decodes one sequence at a time, with a warning.
    batch_invariant: bool = False
    #: Largest dynamic batch (texts for Embed, rows for Predict); None: each model's own.
    max_batch_size: int | None = None
    #: Milliseconds to wait for more requests to fill a batch while the model is
    #: idle; None: each model's own.
    max_batch_delay_ms: float | None = None
    #: Most streaming calls in flight on the whole server; more get RESOURCE_EXHAUSTED.
    max_streams: int = 256
    #: Where models run unless one says otherwise (its ``model.toml``, its class):
    #: ``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` (the
    #: current CUDA device) or ``cuda:N``.
    device: str = "auto"
    #: The dtype models compute in unless one says otherwise: ``float32``,
    #: ``float16`` or ``bfloat16``.
    dtype: str = "float32"
    #: Threads torch uses inside one model call (``torch.set_num_threads``);
    #: None: torch's default, one per core.
    torch_threads: int | None = None
    #: Write the port actually bound to this file once serving (useful with port 0).
    port_file: str | None = None
    #: Logging level name.
    log_level: str = "INFO"
    #: ``text`` (for people) or ``json`` (one object per line, for log pipelines).
    log_format: str = "text"
    #: Port of the Prometheus ``/metrics`` HTTP endpoint (on ``host``); 0 picks a
    #: free one; None (the default) serves no metrics.
    metrics_port: int | None = None
    #: Serve gRPC server reflection (grpcurl, buf curl, the gateway's
    #: ``--from-reflection``); off: the schema is not served (docs/security.md).
    reflection: bool = True
    # The workers of --workers, among themselves (server/siblings.py): set by their
    # supervisor, one environment variable each, never by hand.
    #: A unix socket this worker also listens on, for its sibling workers only, in a
    #: folder only this user may enter (0700); None: none.
    worker_socket: str | None = None
    #: The sibling workers' sockets: a model loaded or unloaded here is then loaded or
    #: unloaded on each, and a worker that starts catches up with one of them.
    sibling_sockets: tuple[str, ...] = ()
    #: The hex secret the workers of one supervisor prove themselves to each other
    #: with (``x-protoserve-sibling``); from the environment only, never a flag.
    sibling_secret: str | None = field(default=None, repr=False)

    @property
    def model_control_on(self) -> bool:
        """Whether models may be loaded and unloaded at all (who may is the token
        check's business, :mod:`protoserve.server.auth`): ``model_control`` when
        given, else whether there are admin tokens."""
        if self.model_control is None:
            return self.admin_token_file is not None
        return self.model_control


_HELP = {
    "host": "address to listen on (default %(default)s)",
    "port": "port to listen on; 0 picks a free port (default %(default)s)",
    "workers": "server processes on the one port (SO_REUSEPORT), each with its own copy of "
    "the models; worker I serves metrics on --metrics-port + I (default %(default)s)",
    "worker_index": argparse.SUPPRESS,  # set by the supervisor of --workers
    "certfile": "serve gRPC over TLS with this certificate chain (PEM; needs --keyfile) "
    "(default: plaintext)",
    "keyfile": "the private key of --certfile (unencrypted PEM)",
    "client_ca": "mTLS: require client certificates signed by these CA certificates (PEM; "
    "needs --certfile)",
    "models": "model to serve, repeatable: bytelm, package.module:Class, or a .pt/.pt2 "
    "file, optionally as NAME=SPEC (default: bytelm)",
    "model_repository": "serve every model folder of this folder (model.toml and numbered "
    "version folders); works beside --model (default: none)",
    "model_control": "let clients load and unload repository models while serving; "
    "default: callers with an admin token only (--admin-token-file), nobody without one; "
    "--model-control: any caller, also without admin tokens (for local use)",
    "auth_token_file": "require a bearer token on every call but health: FILE holds the "
    "accepted tokens, one a line (default: no token needed)",
    "admin_token_file": "admin bearer tokens, one a line: the only ones that may load and "
    "unload models (default: none)",
    "public_health": "health checks answer without a token (default: on)",
    "public_reflection": "server reflection answers without a token (default: off: it "
    "needs one when --auth-token-file is given)",
    "max_receive_message_bytes": "largest request message in bytes (default %(default)s)",
    "max_send_message_bytes": "largest response message in bytes (default %(default)s)",
    "request_read_timeout": "seconds a unary call gets to send its one request message and "
    "end its stream, else DEADLINE_EXCEEDED (default %(default)s)",
    "max_streams_per_connection": "concurrent HTTP/2 streams (calls) on one connection; more "
    "are refused; keep it above --max-streams when a gateway fronts the server "
    "(default %(default)s)",
    "keepalive_time": "seconds a connection may be quiet before the server pings it "
    "(default %(default)s)",
    "keepalive_timeout": "seconds the server waits for a ping's ack before closing the "
    "connection (default %(default)s)",
    "keepalive_min_ping_interval": "seconds a client's pings must be apart while no data "
    "flows; closer ones are strikes (default %(default)s)",
    "keepalive_max_ping_strikes": "strikes a connection may have before it gets GOAWAY "
    "ENHANCE_YOUR_CALM (too_many_pings) (default %(default)s)",
    "keepalive_permit_without_calls": "accept client pings on a connection with no calls "
    "(default: off: each one is a strike)",
    "max_connection_age": "seconds a connection may live before it gets GOAWAY, so that "
    "clients connect again and re-resolve the server's name (default: no limit)",
    "max_connection_age_grace": "seconds the calls on a connection past its age get to end "
    "before it closes (default: no limit)",
    "instances": "copies of each model run at once, each in a worker thread of its own; "
    "a request goes to the least busy (default %(default)s; model.toml's instances wins)",
    "shutdown_grace": "seconds calls in flight get to finish on SIGTERM/SIGINT "
    "(default %(default)s)",
    "max_queue": "per model, most requests waiting before RESOURCE_EXHAUSTED (default %(default)s)",
    "max_active": "per model, most requests run at once; generations decode together "
    "(default %(default)s)",
    "batching": "batch requests that arrive together into one model call, and decode "
    "generations together (default: on)",
    "batch_invariant": "generations decoded together get bit for bit the tokens each gets "
    "alone, on every CPU; slower (default: off: the same to float rounding)",
    "max_batch_size": "largest dynamic batch: texts for Embed, rows for Predict "
    "(default: each model's own; 1 turns dynamic batching off)",
    "max_batch_delay_ms": "milliseconds an idle model waits for more requests to fill "
    "a batch (default: each model's own)",
    "device": "where models run unless their model.toml or class says otherwise: auto (the "
    "GPU when torch sees one, else the CPU), cpu, cuda or cuda:N (default %(default)s)",
    "dtype": "the dtype models compute in unless their model.toml or class says otherwise "
    "(default %(default)s)",
    "torch_threads": "threads torch uses inside one model call (default: one per core)",
    "max_streams": "most streaming calls in flight on the server before "
    "RESOURCE_EXHAUSTED (default %(default)s)",
    "port_file": "write the bound port to this file once serving",
    "log_level": "DEBUG, INFO, WARNING or ERROR (default %(default)s)",
    "log_format": "text, or json for one JSON object per line (default %(default)s)",
    "metrics_port": "serve Prometheus metrics over HTTP at /metrics on this port; "
    "0 picks a free port (default: off)",
    "reflection": "serve gRPC server reflection, for grpcurl, buf curl and the gateway's "
    "--from-reflection (default: on; --no-reflection turns it off)",
    # Set by the supervisor of --workers for each worker (server/siblings.py): hidden.
    "worker_socket": argparse.SUPPRESS,  # a unix socket for the sibling workers only
    "sibling_sockets": argparse.SUPPRESS,  # the siblings' sockets, comma-separated
    "sibling_secret": argparse.SUPPRESS,  # hex; PROTOSERVE_SIBLING_SECRET only
}
#: Settings that are None by default and a number when given.
_OPTIONAL: dict[str, type] = {
    "certfile": str,
    "keyfile": str,
    "client_ca": str,
    "model_repository": str,
    "auth_token_file": str,
    "admin_token_file": str,
    "metrics_port": int,
    "worker_index": int,
    "max_batch_size": int,
    "max_batch_delay_ms": float,
    "torch_threads": int,
    "max_connection_age": float,
    "max_connection_age_grace": float,
}
_CHOICES = {
    "log_format": ("text", "json"),
    "dtype": ("float32", "float16", "bfloat16"),
}
_METAVARS = {
    "model_repository": "DIR",
    "certfile": "PEM",
    "keyfile": "PEM",
    "client_ca": "PEM",
    "auth_token_file": "FILE",
    "admin_token_file": "FILE",
    "workers": "N",
    "instances": "N",
    "device": "DEVICE",
    # gRPC transport limits
    "request_read_timeout": "SECONDS",
    "max_streams_per_connection": "STREAMS",
    "keepalive_time": "SECONDS",
    "keepalive_timeout": "SECONDS",
    "keepalive_min_ping_interval": "SECONDS",
    "max_connection_age": "SECONDS",
    "max_connection_age_grace": "SECONDS",
}
#: Switches that are None unless given: something else decides (see ServerConfig).
_UNDECIDED = frozenset({"model_control"})
#: Settings read from their environment variable only: a flag's value is in ``ps``,
#: for every user of the machine to read.
_ENV_ONLY = frozenset({"sibling_secret"})
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_name(name: str) -> str:
    """The environment variable behind a setting: ``PROTOSERVE_MAX_QUEUE`` for ``max_queue``."""
    return f"PROTOSERVE_{name.upper()}"


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Add one flag per setting, its default taken from the environment when set there."""
    env = os.environ if env is None else env
    defaults = ServerConfig()
    bad: list[str] = []
    for f in fields(ServerConfig):
        flag = "--model" if f.name == "models" else "--" + f.name.replace("_", "-")
        raw = env.get(env_name(f.name))
        default = getattr(defaults, f.name)
        help_text = _HELP[f.name]
        if help_text != argparse.SUPPRESS:
            help_text += f" [env {env_name(f.name)}]"
        if f.name in _ENV_ONLY:
            parser.set_defaults(**{f.name: raw or None})
            continue
        if f.name == "models":
            parser.add_argument(
                flag,
                dest="models",
                action="append",
                metavar="SPEC",
                help=help_text,
                default=None,
            )
            continue
        if isinstance(default, bool) or f.name in _UNDECIDED:
            if raw is not None:
                if raw.strip().lower() not in _TRUE + _FALSE:
                    bad.append(
                        f"{env_name(f.name)}={raw!r} is not one of {'/'.join(_TRUE)} "
                        f"or {'/'.join(_FALSE)}"
                    )
                default = raw.strip().lower() in _TRUE
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        kind = _OPTIONAL.get(f.name) or {int: int, float: float}.get(type(default), str)
        if raw is not None:
            try:
                default = kind(raw)
            except ValueError:
                bad.append(f"{env_name(f.name)}={raw!r} is not a valid {kind.__name__}")
            if f.name in _CHOICES and default not in _CHOICES[f.name]:
                bad.append(
                    f"{env_name(f.name)}={raw!r} is not one of {', '.join(_CHOICES[f.name])}"
                )
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=default,
            choices=_CHOICES.get(f.name),
            help=help_text,
            metavar=None
            if f.name in _CHOICES
            else _METAVARS.get(f.name, f.name.split("_")[-1].upper()),
        )

    if bad:
        # Reported once every flag is known, so the usage line is whole.
        parser.error("; ".join(bad))


def from_arguments(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerConfig:
    """The config the parsed flags (and, for models, ``PROTOSERVE_MODELS``) describe.

    With a model repository and no model spec, the server serves the repository
    only (not the built-in model as well).
    """
    env = os.environ if env is None else env
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if f.name != "models"}
    models: Sequence[str] | None = args.models
    if not models and env.get(env_name("models")):
        models = [m.strip() for m in env[env_name("models")].split(",") if m.strip()]
    for name in ("model_repository", "auth_token_file", "admin_token_file"):
        values[name] = values[name] or None  # "" in the environment
    for name in ("certfile", "keyfile", "client_ca"):  # TLS files: "" is none, too
        values[name] = values[name] or None
    # The workers' sockets: "" is none; siblings comma-separated, as their supervisor
    # passes them.
    values["worker_socket"] = values["worker_socket"] or None
    sockets = values["sibling_sockets"]
    if isinstance(sockets, str):
        values["sibling_sockets"] = tuple(p.strip() for p in sockets.split(",") if p.strip())
    default = () if values["model_repository"] else ServerConfig.models
    return ServerConfig(models=tuple(models or default), **values)
