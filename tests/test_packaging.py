"""The distribution as a user installs it: one wheel, the protoserve namespace, the weights."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (found,) = out.glob("protoserve-*.whl")
    return found


def test_wheel_holds_one_namespace_and_no_top_level_modules(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("protoserve-")}
    assert top == {"protoserve"}, "only the protoserve namespace may land in site-packages"
    assert "protoserve/__init__.py" not in names  # a namespace spanning gen/ and the packages
    for module in (
        "protoserve/server/__init__.py",
        "protoserve/gateway/__init__.py",
        "protoserve/clients/cli.py",
        "protoserve/inference/v1/inference_service_pb2.py",
        "protoserve/inference/v1/inference_service_pb2.pyi",
        "protoserve/inference/v1/inference_service_pb2_grpc.py",
        "protoserve/server/models/weights/bytelm.safetensors",
        "protoserve/server/models/weights/bytelm.json",
    ):
        assert module in names, module


def test_every_source_folder_is_packaged(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (
        ("server", "protoserve/server"),
        ("gateway", "protoserve/gateway"),
        ("clients", "protoserve/clients"),
        ("common", "protoserve/common"),
        ("gen/protoserve", "protoserve"),
    ):
        for source in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in source.parts:
                continue
            wanted = f"{package}/{source.relative_to(ROOT / folder).as_posix()}"
            assert wanted in names, f"{source.relative_to(ROOT)} is missing from the wheel"


def test_installed_wheel_imports_and_serves_help(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    code = (
        "import protoserve.server, protoserve.gateway, protoserve.clients;"
        "from protoserve.inference.v1 import inference_service_pb2_grpc;"
        "from protoserve.server.models import bytelm;"
        f"assert protoserve.server.__file__.startswith({str(target)!r}),"
        " protoserve.server.__file__;"
        "print(bytelm.load_pretrained().config.d_model > 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    for module in ("server", "gateway"):
        assert not (target / module).exists()
