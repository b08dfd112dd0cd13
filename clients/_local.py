"""``LocalClient``: the client API over a model in this process, no network.

Application code written against :class:`~protoserve.clients.Client` runs
unchanged against a local model: the same methods, return types and
exceptions. Only the construction differs::

    client = LocalClient("bytelm")            # in this process
    client = Client("models.internal:50051")  # behind the network

The model runs in the server's own runtime (its worker thread, validation,
stop sequences, cancellation), on an event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Coroutine, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from ._closing import Closing
from ._convert import GENERATION_PARAMETERS, StreamPart
from ._errors import DeadlineExceeded, ProtoserveError, from_status
from ._stream import Source, TextStream
from ._types import FinishReason, Generation, ModelInfo, ParameterInfo, Usage

if TYPE_CHECKING:
    import torch

    from protoserve.server import Model

__all__ = ["LocalClient", "LocalTextStream"]

T = TypeVar("T")
_PARAMETER_TYPES = {
    int: "integer",
    float: "float",
    bool: "boolean",
    str: "string",
    list: "string_list",
}


def _check_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    for name in parameters:
        if name not in GENERATION_PARAMETERS:
            raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
    given = {k: v for k, v in parameters.items() if v is not None}
    if isinstance(given.get("stop_sequences"), str):
        given["stop_sequences"] = [given["stop_sequences"]]
    return given


def _typed(error: Exception) -> Exception:
    """The client's exception for a runtime error (same class as over the network)."""
    from protoserve.server import ProtoserveError as ServerError

    if isinstance(error, ServerError):
        return from_status(error.code, error.message, error.details)
    if isinstance(error, TimeoutError):
        return DeadlineExceeded("Deadline Exceeded")
    return error


def _part(chunk: Any) -> StreamPart:
    """A runtime chunk as a stream step (finish reason and usage on the last one only)."""
    if chunk.finish_reason is None:
        return chunk.text, tuple(chunk.token_ids), None, None
    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    return chunk.text, tuple(chunk.token_ids), FinishReason(chunk.finish_reason.value), usage


class _LocalChunks:
    """A generation's chunks, read on the client's loop; closing them stops the model."""

    def __init__(self, client: LocalClient, chunks: AsyncGenerator[Any, None]) -> None:
        self._client = client
        self._chunks = chunks

    def __iter__(self) -> Generator[StreamPart, None, None]:
        try:
            while True:
                try:
                    chunk = self._client._run(anext(self._chunks), None)
                except StopAsyncIteration:
                    return
                yield _part(chunk)
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self._client._closed:
            self._client._run(self._chunks.aclose(), None)


class LocalTextStream(TextStream):
    """Text chunks of a local generation as they are produced; ``break`` cancels it.

    So does :meth:`cancel`: the model stops before its next step. After the end:
    ``finish_reason``, ``usage``, ``token_ids``, ``text``.
    """

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.usage = Usage()


class LocalClient(Closing):
    """The client API over models loaded in this process.

    Its methods are those of the other clients, with the same values and
    exceptions, but not their code: they call the server's ``Runtime`` with
    Python values, no message in between, and take no ``metadata``.

    Args:
        *models: model specs as for ``protoserve serve --model`` (``"bytelm"``,
            ``"pkg.module:Class"``, a ``.pt``/``.pt2`` file, ``"NAME=SPEC"``) or
            :class:`protoserve.server.Model` instances. Default: the built-in model.
        model: the default model for calls; default: the only model.
        timeout: default deadline of every call, in seconds.
    """

    def __init__(
        self, *models: str | Model, model: str | None = None, timeout: float | None = None
    ) -> None:
        from protoserve.server import Runtime
        from protoserve.server.runtime.loader import load_model_spec

        pairs = [
            load_model_spec(m) if isinstance(m, str) else (type(m).name, m)
            for m in (models or ("bytelm",))
        ]
        self._default = model
        self._timeout = timeout
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="protoserve-local", daemon=True
        )
        self._thread.start()
        self._runtime = Runtime(pairs)
        self._run(self._runtime.start(), None)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if timeout is not None:
            coro = asyncio.wait_for(coro, timeout)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except (ProtoserveError, StopAsyncIteration):
            raise
        except Exception as error:
            raise _typed(error) from None

    def _model(self, model: str | None) -> str:
        chosen = model or self._default
        if chosen:
            return chosen
        names = [entry.name for entry in self._runtime.list_models()]
        if len(names) != 1:
            raise ValueError(f"name a model: this client holds {', '.join(names)}")
        return names[0]

    def models(self, **_: Any) -> list[ModelInfo]:
        """Every model this client holds."""
        return [_model_info(entry) for entry in self._runtime.list_models()]

    def model(self, name: str, **_: Any) -> ModelInfo:
        """One model. Raises NotFound."""
        try:
            return _model_info(self._runtime.get_model(name))
        except Exception as error:
            raise _typed(error) from None

    def generate(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        **parameters: Any,
    ) -> Generation:
        """The whole continuation of ``text`` (a ``str`` with finish reason and usage)."""
        name = self._model(model)
        given = _check_parameters(parameters)
        result = self._run(self._runtime.generate(name, text, given), timeout or self._timeout)
        return Generation(
            result.text,
            finish_reason=FinishReason(result.finish_reason.value),
            usage=Usage(result.usage.prompt_tokens, result.usage.completion_tokens),
            token_ids=result.token_ids,
            model=name,
        )

    def generate_stream(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        **parameters: Any,
    ) -> LocalTextStream:
        """Text chunks as they are produced; leaving the loop early stops the model."""
        name = self._model(model)
        given = _check_parameters(parameters)
        return LocalTextStream(_LocalChunks(self, self._runtime.generate_stream(name, text, given)))

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        normalize: bool = True,
        timeout: float | None = None,
    ) -> torch.Tensor:
        """One vector per text (``[N, D]``), or ``[D]`` for a single string."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        vectors, _ = self._run(
            self._runtime.embed(self._model(model), batch, normalize=normalize),
            timeout or self._timeout,
        )
        return vectors[0] if isinstance(texts, str) else vectors

    def predict(
        self,
        tensors: Mapping[str, torch.Tensor | npt.NDArray[Any]],
        *,
        model: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, torch.Tensor | npt.NDArray[Any]]:
        """Named tensors in, named tensors out (numpy out when every input was numpy)."""
        import torch

        from protoserve.server.runtime.tensors import from_raw, to_raw

        as_numpy = all(isinstance(v, np.ndarray) for v in tensors.values())
        raw = [
            to_raw(k, v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)))
            for k, v in tensors.items()
        ]
        outputs = self._run(
            self._runtime.predict(self._model(model), raw, parameters or {}),
            timeout or self._timeout,
        )
        values = from_raw(outputs, field="outputs")
        return {
            k: (v.numpy() if as_numpy and v.dtype != torch.bfloat16 else v)
            for k, v in values.items()
        }

    def close(self) -> None:
        """Stop the models' worker threads and the loop."""
        if self._closed:
            return
        self._closed = True
        self._runtime.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _TASK_ORDER() -> list[Any]:
    from protoserve.server import Task

    return list(Task)  # the proto's order: generation, embedding, prediction


def _model_info(entry: Any) -> ModelInfo:
    model = entry.model
    return ModelInfo(
        name=entry.name,
        version=model.version,
        tasks=tuple(t.value for t in _TASK_ORDER() if t in model.tasks()),
        state=entry.state.value,
        description=model.description,
        parameters=tuple(
            ParameterInfo(
                p.name,
                p.task.value,
                _PARAMETER_TYPES.get(p.type, "unspecified"),
                p.default,
                p.minimum,
                p.maximum,
                p.description,
            )
            for p in model.parameters()
        ),
        state_message=entry.state_message,
    )
