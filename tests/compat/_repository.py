"""A model repository for `protoserve serve --model-repository`, built in a temporary folder.

The layout is the server's (protoserve.server.runtime.repository): one folder per model
holding a `model.toml` and numbered version folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: model name -> the class that serves it (tests/compat/models.py).
SOURCES = {
    "add_sub_fp32": "tests.compat.models:AddSubFP32",
    "add_sub_int64": "tests.compat.models:AddSubINT64",
    "add_sub_fp16": "tests.compat.models:AddSubFP16",
    "spare_fp32": "tests.compat.models:AddSubFP32",
}


def build_repository(folder: Path, models: Sequence[str], *, text: str) -> None:
    """One folder per model: the add/sub models by class, `text` as the built-in bytelm."""
    for name in models:
        _model_folder(folder, name, SOURCES[name])
    _model_folder(folder, text, "bytelm")


def _model_folder(folder: Path, name: str, source: str) -> None:
    """`NAME/model.toml` naming the source, and version folder `1/`."""
    model = folder / name
    (model / "1").mkdir(parents=True)
    (model / "model.toml").write_text(f'source = "{source}"\n')
