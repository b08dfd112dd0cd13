"""Embed and Predict requests as model calls: joined into one call, split back per request.

The scheduler forms the batches (``Scheduler.run_batched``); what it runs, in the
model's worker thread, is here: ``embed`` on every text of a batch, each request's
rows normalized as it asked, or ``predict`` on the requests' inputs joined along
dimension 0 (for a model that sets ``predict_batches``, and requests whose
:func:`predict_batch_key` agree).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from typing import Any

import torch

from protoserve.server.runtime.devices import to_device, to_host
from protoserve.server.runtime.model import Model
from protoserve.server.runtime.tensors import RawTensor, to_raw

__all__ = ["embed_batch", "predict_batch", "predict_batch_key", "predict_on_device"]


def embed_batch(model: Model, payloads: list[tuple[list[str], bool]]) -> list[torch.Tensor]:
    """One ``embed`` call for the texts of every request; each request's rows back, as
    float32 on the CPU, normalized when it asked (its payload is ``(texts, normalize)``)."""
    vectors = _embeddings(model, [t for texts, _ in payloads for t in texts])
    out, start = [], 0
    for part, normalize_part in payloads:
        rows = vectors[start : start + len(part)]
        start += len(part)
        if normalize_part:
            rows = torch.nn.functional.normalize(rows, dim=-1)
        out.append(rows.clone())
    return out


def _embeddings(model: Model, texts: list[str]) -> torch.Tensor:
    """``model.embed(texts)`` as float32 rows on the CPU; a wrong shape is the model's error."""
    vectors = model.embed(texts)
    if not isinstance(vectors, torch.Tensor) or vectors.shape[:1] != (len(texts),):
        raise TypeError(
            f"{type(model).__name__}.embed returned "
            f"{getattr(vectors, 'shape', type(vectors))} for {len(texts)} texts"
        )
    return vectors.detach().to("cpu", torch.float32).reshape(len(texts), -1)


def predict_on_device(
    model: Model, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """``model.predict`` with its inputs moved to the model's device and its outputs
    back on the CPU: one copy of each tensor each way per model call. Dtypes are left
    as they are (the model casts to its own: docs/devices.md)."""
    device = model.device
    if isinstance(device, torch.device):  # placed (a model not run by a runtime is not)
        inputs = to_device(inputs, device)
    outputs = model.predict(inputs, params)
    return to_host(outputs)


def predict_batch_key(tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Hashable:
    """What requests must share to be run together: input dtypes and shapes but the
    first dimension, and the parameters. None when this request cannot be batched."""
    if not tensors or any(t.ndim == 0 for t in tensors.values()):
        return None
    if len({t.shape[0] for t in tensors.values()}) != 1:
        return None  # inputs disagree on the rows; the model will say what it thinks
    try:
        params_key = json.dumps(params, sort_keys=True)
    except (TypeError, ValueError):
        return None
    inputs = tuple(sorted((n, str(t.dtype), tuple(t.shape[1:])) for n, t in tensors.items()))
    return inputs, params_key


def predict_batch(
    model: Model, batch: list[Mapping[str, torch.Tensor]], params: Mapping[str, Any]
) -> list[list[RawTensor]]:
    """One ``predict`` call on requests' inputs joined along dimension 0, split back per request."""
    rows = [next(iter(tensors.values())).shape[0] for tensors in batch]
    if len(batch) == 1:
        joined = batch[0]
    else:
        joined = {name: torch.cat([tensors[name] for tensors in batch]) for name in batch[0]}
    outputs = predict_on_device(model, joined, params)
    results: list[list[RawTensor]] = [[] for _ in batch]
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != sum(rows):
            raise RuntimeError(
                f"{type(model).__name__} sets predict_batches, but its output {name!r} has "
                f"shape {list(value.shape)} for {sum(rows)} input rows"
            )
        for result, part in zip(results, torch.split(value, rows), strict=True):
            result.append(to_raw(name, part))
    return results
