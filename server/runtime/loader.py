"""Turning a model spec from the command line into a model instance.

A spec is ``[NAME=]SOURCE`` where SOURCE is one of:

- ``bytelm``: the built-in byte-level language model;
- ``package.module:Class``: a user's subclass of :class:`Model`, built with no arguments;
- a path to a TorchScript file (``.pt``, ``.pth``, ``.ts``, ``.torchscript``) or a
  ``torch.export`` archive (``.pt2``), served for Predict.

NAME sets the name the model is served under; it defaults to the class's
``name``, or the file's stem.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from protoserve.server.runtime.model import Model

__all__ = ["ModelSpecError", "load_model_spec"]

BUILTIN = "bytelm"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TORCHSCRIPT = {".pt", ".pth", ".ts", ".torchscript"}


class ModelSpecError(ValueError):
    """A model spec that names nothing servable; the message says what was wrong."""


def load_model_spec(spec: str) -> tuple[str, Model]:
    """``(served name, model)`` for a spec; the model is built but not yet loaded.

    Raises:
        ModelSpecError: the spec is malformed, the module or class is missing, the
            class is not a Model, or the file does not exist.
    """
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = "", spec
    source = source.strip()
    model: Model
    if source == BUILTIN:
        from protoserve.server.models.builtin import ByteLMModel

        model = ByteLMModel()
    elif Path(source).suffix in _TORCHSCRIPT | {".pt2"}:
        path = Path(source)
        if not path.is_file():
            raise ModelSpecError(f"model file {source!r} does not exist")
        from protoserve.server.models.torchfile import TorchFileModel

        model = TorchFileModel(path)
        name = name or path.stem
    elif ":" in source:
        module_name, _, class_name = source.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelSpecError(f"cannot import {module_name!r}: {exc}") from exc
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Model)):
            raise ModelSpecError(
                f"{source!r} is not a subclass of protoserve.server.Model"
                if cls is not None
                else f"module {module_name!r} has no {class_name!r}"
            )
        model = cls()
    else:
        raise ModelSpecError(
            f"cannot tell what {spec!r} is: expected 'bytelm', 'package.module:Class', "
            "or a .pt/.pt2 file, optionally after 'NAME='"
        )
    name = name or type(model).name
    if not _NAME.match(name):
        raise ModelSpecError(
            f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name, model
