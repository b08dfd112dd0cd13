"""Turning a model spec from the command line into a model instance.

A spec is ``[NAME=]SOURCE`` where SOURCE is one of:

- ``bytelm``: the built-in byte-level language model;
- ``package.module:Class``: a user's subclass of :class:`Model`, built with no arguments;
- a path to a TorchScript file (``.pt``, ``.pth``, ``.ts``, ``.torchscript``) or a
  ``torch.export`` archive (``.pt2``), served for Predict.

NAME sets the name the model is served under; it defaults to the class's
``name``, or the file's stem. The model repository (:mod:`.repository`) builds
its models from the same SOURCE forms, through :func:`model_from_source`.

The named sources and the file types are registered here by the models that
serve them (:func:`register_source`, :func:`register_file_type`): the built-in
ones by :mod:`protoserve.server.models`, which ``protoserve.server`` imports.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from protoserve.server.runtime.model import Model

__all__ = [
    "ModelSpecError",
    "check_model_name",
    "is_file_source",
    "is_named_source",
    "load_model_spec",
    "model_from_source",
    "register_file_type",
    "register_source",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Named sources ("bytelm"), each with what builds a new model of it.
_NAMED: dict[str, Callable[[], Model]] = {}
#: Model files by suffix (".pt2"), each with what builds a new model of a file.
_FILE_TYPES: dict[str, Callable[[Path], Model]] = {}


def register_source(name: str, build: Callable[[], Model]) -> None:
    """Serve ``name`` as a SOURCE: ``build()`` makes a new, not yet loaded, model."""
    _NAMED[name] = build


def register_file_type(suffixes: Iterable[str], build: Callable[[Path], Model]) -> None:
    """Serve files whose name ends in one of ``suffixes`` (".pt2"): ``build(path)``
    makes a new, not yet loaded, model of the file."""
    for suffix in suffixes:
        _FILE_TYPES[suffix] = build


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
    model = model_from_source(source, spec=spec)
    if is_file_source(source):
        name = name or Path(source).stem
    name = name or type(model).name
    check_model_name(name)
    return name, model


def is_named_source(source: str) -> bool:
    """True when ``source`` is a registered name (``bytelm``)."""
    return source in _NAMED


def is_file_source(source: str) -> bool:
    """True when ``source`` names a file of a registered type (TorchScript, ``torch.export``)."""
    return Path(source).suffix in _FILE_TYPES


def model_from_source(source: str, *, folder: Path | None = None, spec: str = "") -> Model:
    """A new, not yet loaded, model for SOURCE (see the module docstring).

    A file is looked for in ``folder`` when given (a relative path is relative
    to it). ``spec`` is what the error messages quote when SOURCE is not understood.

    Raises:
        ModelSpecError: as :func:`load_model_spec`.
    """
    if is_named_source(source):
        return _NAMED[source]()
    if is_file_source(source):
        path = Path(source) if folder is None else folder / source
        if not path.is_file():
            raise ModelSpecError(f"model file {str(path)!r} does not exist")
        return _FILE_TYPES[path.suffix](path)
    if ":" in source:
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
        return cls()
    raise ModelSpecError(
        f"cannot tell what {spec or source!r} is: expected 'bytelm', 'package.module:Class', "
        "or a .pt/.pt2 file" + (", optionally after 'NAME='" if spec else "")
    )


def check_model_name(name: str) -> None:
    """Raises ModelSpecError unless ``name`` can be served (and be a label, a path part)."""
    if not _NAME.match(name):
        raise ModelSpecError(
            f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
