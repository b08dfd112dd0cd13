"""dev.py, the README's way in: `python3 dev.py up`, `python3 dev.py tests`.

The runs are real: dev.py, copied with noxfile.py into a scratch folder, makes its
virtualenv there, installs nox from the package index and lists the sessions, with
Debian's own (externally managed, PEP 668) Python; and it says what to install,
in one line, when run by a Python whose standard library has no ensurepip, which
is what Debian and Ubuntu's Python is without python3-venv.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests._tools import missing

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEBIAN_PYTHON = Path("/usr/bin/python3")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _load(name: str) -> ModuleType:
    """Import ROOT/`name`.py by its path (neither dev.py nor noxfile.py is a package)."""
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", ROOT / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dev = _load("dev")


@functools.cache
def _noxfile() -> ModuleType:
    return _load("noxfile")  # imports nox (the test extra has it)


def _debian_python() -> Path:
    """/usr/bin/python3 when it is 3.11 or later; skips (fails on CI) otherwise."""
    problem = None
    if not DEBIAN_PYTHON.exists():
        problem = f"{DEBIAN_PYTHON} does not exist (not Debian or Ubuntu)"
    else:
        version = subprocess.run(
            [str(DEBIAN_PYTHON), "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if version.stdout.strip() != "True":
            problem = f"{DEBIAN_PYTHON} is older than 3.11"
    if problem:
        missing(problem)
    return DEBIAN_PYTHON


def _checkout(tmp_path: Path) -> Path:
    """The part of the checkout that `dev.py --list` reads, in a scratch folder."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("dev.py", "noxfile.py"):
        shutil.copy2(ROOT / name, root / name)
    return root


def _env() -> dict[str, str]:
    """This environment, less what would point another Python at this one's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(python: Path | str, checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), str(checkout / "dev.py"), *args],
        cwd=checkout.parent,  # dev.py finds its checkout from its own path
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_system_python_makes_the_venv_installs_nox_and_lists_the_sessions(
    tmp_path: Path,
) -> None:
    python = _debian_python()
    checkout = _checkout(tmp_path)

    first = _run(python, checkout, "--list")

    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"^[*-] tests\b", first.stdout, re.M), first.stdout
    assert re.search(r"^[*-] up\b", first.stdout, re.M), first.stdout
    venv = checkout / ".nox" / "_nox"
    config = (venv / "pyvenv.cfg").read_text()
    assert f"executable = {python.resolve()}" in config.splitlines(), config
    (metadata,) = venv.glob(f"lib/python3.*/site-packages/nox-{dev.NOX_VERSION}.dist-info/METADATA")
    installed = metadata.stat().st_mtime_ns

    # The second run finds nox there and goes straight to it.
    again = _run(python, checkout, "--list")

    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout == first.stdout
    assert metadata.stat().st_mtime_ns == installed


def _python_without_ensurepip(base: Path, where: Path) -> Path:
    """A copy of the Python `base` whose standard library lacks ensurepip.

    That is Debian's and Ubuntu's Python without python3-venv (which ships
    ensurepip): the copy finds its standard library next to itself, a folder of
    links to `base`'s, every entry but ensurepip.
    """
    found = subprocess.run(
        [
            str(base),
            "-c",
            "import sys, sysconfig; print(sysconfig.get_path('stdlib')); print(sys.base_prefix)",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    )
    stdlib, prefix = (Path(line) for line in found.stdout.splitlines())
    binary = where / "bin" / base.resolve().name
    binary.parent.mkdir(parents=True)
    shutil.copy2(base.resolve(), binary)
    lib = where / "lib" / stdlib.name
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "ensurepip":
            (lib / entry.name).symlink_to(entry)
    for shared in (prefix / "lib").glob("libpython*.so*"):  # a build with a shared libpython
        (where / "lib" / shared.name).symlink_to(shared)
    probe = subprocess.run(
        [str(binary), "-c", "import importlib.util as u; print(u.find_spec('ensurepip'))"],
        capture_output=True,
        text=True,
        check=False,
        env=_env(),
    )
    assert probe.stdout.strip() == "None", f"the copy of {base} still has ensurepip: {probe}"
    return binary


@pytest.mark.parametrize("base", ["debian", "this"])
def test_python_without_ensurepip_gets_one_line_naming_python3_venv(
    tmp_path: Path, base: str
) -> None:
    """Debian's venv prints advice and exits; pyenv's raises: one line either way."""
    this = Path(getattr(sys, "_base_executable", sys.executable))  # not a venv's python
    python = _python_without_ensurepip(
        _debian_python() if base == "debian" else this, tmp_path / "python"
    )
    checkout = _checkout(tmp_path)

    done = _run(python, checkout, "tests")

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"dev.py: this Python ({python} 3."), line
    assert "cannot make virtual environments" in line
    if shutil.which("apt-get"):
        assert "install python3-venv (sudo apt install python3-venv python3." in line
    else:
        assert "(it has no ensurepip)" in line
    assert not (checkout / ".nox" / "_nox").exists()


def test_help_installs_nothing(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path)

    done = _run(sys.executable, checkout, "--help")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python3 dev.py SESSION [ARGS...]")
    assert not (checkout / ".nox").exists()


def test_python_older_than_3_11_gets_one_line() -> None:
    assert dev.python_problem((3, 11, 0), "/usr/bin/python3") is None
    assert dev.python_problem((3, 10, 12), "/usr/bin/python3") == (
        "dev.py: this Python (/usr/bin/python3 3.10.12) is too old: protoserve needs "
        "Python 3.11 or later; run dev.py with one (python3.11 dev.py ...)"
    )


def test_an_older_python_can_read_dev_py_as_far_as_the_version_check() -> None:
    # Python 3.7's grammar (`from __future__ import annotations` is 3.7's): an older
    # Python that could not even parse the file would answer with a SyntaxError.
    ast.parse((ROOT / "dev.py").read_text(), feature_version=(3, 7))


@pytest.mark.parametrize(
    ("args", "nox_args"),
    [
        (["up"], ["-s", "up"]),
        (["up", "--http-port", "9000"], ["-s", "up", "--", "--http-port", "9000"]),
        (["up", "--", "--http-port", "9000"], ["-s", "up", "--", "--http-port", "9000"]),
        (["tests", "tests/gateway", "-x"], ["-s", "tests", "--", "tests/gateway", "-x"]),
        (["up", "--help"], ["-s", "up", "--", "--help"]),
        (["--list"], ["--list"]),
    ],
)
def test_arguments_after_the_session_go_to_it(args: list[str], nox_args: list[str]) -> None:
    assert dev.nox_argv(args) == [str(ROOT / ".nox" / "_nox" / "bin" / "nox"), *nox_args]


@pytest.mark.parametrize("args", [[], ["-h"], ["--help"]])
def test_no_session_means_the_usage(args: list[str]) -> None:
    assert dev.nox_argv(args) is None


def test_an_option_in_place_of_the_session_is_refused() -> None:
    with pytest.raises(dev.UsageError, match=r"unknown option '-s'"):
        dev.nox_argv(["-s", "tests"])


def test_readme_names_the_torch_index_that_the_noxfile_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    noxfile = _noxfile()
    assert f"`{noxfile.TORCH_INDEX_ENV}={CPU_INDEX} python3 dev.py tests`" in README

    monkeypatch.setenv(noxfile.TORCH_INDEX_ENV, CPU_INDEX)
    assert noxfile._project_installs("test") == [
        ["--index-url", CPU_INDEX, noxfile.TORCH],
        ["-e", ".[test]"],
    ]
    monkeypatch.delenv(noxfile.TORCH_INDEX_ENV)
    assert noxfile._project_installs() == [[noxfile.TORCH], ["-e", "."]]


def test_readme_installs_the_torch_that_the_noxfile_pins() -> None:
    noxfile = _noxfile()
    assert f"`pip install --index-url {CPU_INDEX} {noxfile.TORCH}`" in README
