"""Run a nox session of this project with nothing installed but Python: `python3 dev.py tests`.

The README's commands go through this script, so that they work on any Linux with
Python 3.11 or later, including a distribution's own `python3`, into which pip may
not install (Debian 12+, Ubuntu 24.04: PEP 668). It makes a virtual environment
that holds only the pinned nox, at `.nox/_nox`, once; installs that nox into it
when it is missing or another version; and then becomes
`.nox/_nox/bin/nox -s SESSION -- ARGS` (os.execv), so that Ctrl-C and the exit
status are nox's own. Everything else (the sessions' own virtualenvs, what they
install) is the noxfile's business.

Only the standard library, and nothing newer than Python 3.7 before the version
check, so that an older Python gets the one-line answer instead of a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

#: The nox that runs the sessions: change it here only.
NOX_VERSION = "2026.10.20"
MIN_PYTHON = (3, 11)

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".nox" / "_nox"
NOX = VENV / "bin" / "nox"

USAGE = """\
usage: python3 dev.py SESSION [ARGS...]   run a nox session; ARGS go to it (nox's posargs)
       python3 dev.py --list              list the sessions

  python3 dev.py up                       serve the built-in model (gRPC 50051, HTTP 8080)
  python3 dev.py up --http-port 9000      ... with options for `protoserve up`
  python3 dev.py tests                    the whole test suite, as CI runs it
  python3 dev.py tests tests/gateway -x   ... or part of it (arguments go to pytest)

The first run puts nox {version} into .nox/_nox; nox's own options are there too:
.nox/_nox/bin/nox --help.
"""


class SetupError(Exception):
    """Something the user has to fix before the sessions can run; str() is one line."""

    status = 1


class UsageError(SetupError):
    """A command line that dev.py does not understand."""

    status = 2


def python_problem(
    version: tuple[int, ...] = tuple(sys.version_info[:3]),
    executable: str = sys.executable,
) -> str | None:
    """The one-line complaint about a Python too old to run the sessions, or None."""
    if tuple(version[:2]) >= MIN_PYTHON:
        return None
    found = ".".join(str(part) for part in version)
    needed = ".".join(str(part) for part in MIN_PYTHON)
    return (
        f"dev.py: this Python ({executable or 'python'} {found}) is too old: protoserve "
        f"needs Python {needed} or later; run dev.py with one (python{needed} dev.py ...)"
    )


def nox_argv(args: list[str]) -> list[str] | None:
    """nox's command line for dev.py's arguments, or None when they ask for the usage.

    `SESSION a b` runs `nox -s SESSION -- a b`; `--list` runs `nox --list`.
    """
    if not args or args[0] in ("-h", "--help"):
        return None
    if args[0] in ("-l", "--list"):
        return [str(NOX), "--list", *args[1:]]
    if args[0].startswith("-"):
        raise UsageError(
            f"dev.py: unknown option {args[0]!r}: the first argument names a session "
            "(python3 dev.py --list shows them)"
        )
    session, rest = args[0], args[1:]
    if rest[:1] == ["--"]:  # `dev.py up -- --http-port 9000` means what nox means by it
        rest = rest[1:]
    return [str(NOX), "-s", session, *(["--", *rest] if rest else [])]


def _this_python() -> str:
    return f"{sys.executable} {'.'.join(str(part) for part in sys.version_info[:3])}"


def make_venv() -> None:
    """Make VENV (with pip) unless it is there; on failure leave nothing half-made."""
    if _venv_ready():
        return
    # The remains of a run killed halfway, or of a Python since removed.
    shutil.rmtree(VENV, ignore_errors=True)
    # Debian's venv prints its own several-line advice to stdout before it exits; the
    # line below says the same in one, so that advice is kept out of the way.
    advice = io.StringIO()
    try:
        with contextlib.redirect_stdout(advice):
            venv.EnvBuilder(with_pip=True).create(VENV)
    except BaseException as error:  # SystemExit from Debian's venv, Ctrl-C: clean up too
        shutil.rmtree(VENV, ignore_errors=True)
        if isinstance(error, KeyboardInterrupt):
            raise
        if importlib.util.find_spec("ensurepip") is None:
            raise SetupError(_no_ensurepip()) from None
        raise SetupError(
            f"dev.py: could not make the virtual environment {VENV} with {_this_python()}: "
            f"{_last_line(error, advice.getvalue())}"
        ) from None


def _venv_ready() -> bool:
    """True when VENV has a Python that runs (not a dangling symlink) and pip."""
    pip = VENV.glob("lib/python*/site-packages/pip/__init__.py")
    return (VENV / "bin" / "python").exists() and any(pip)


def _no_ensurepip() -> str:
    """What to do about a Python without ensurepip (Debian and Ubuntu without python3-venv)."""
    problem = f"dev.py: this Python ({_this_python()}) cannot make virtual environments"
    if shutil.which("apt-get"):
        packages = f"python3-venv python{sys.version_info[0]}.{sys.version_info[1]}-venv"
        return f"{problem}: install python3-venv (sudo apt install {packages}) and run again"
    return f"{problem} (it has no ensurepip): run dev.py with a Python that has it"


def _last_line(error: BaseException, printed: str) -> str:
    """The last line of the failed command's output, or of what was `printed`, or the error."""
    output = getattr(error, "output", None)
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    text = output if isinstance(output, str) and output.strip() else printed
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else str(error) or type(error).__name__


def nox_installed() -> bool:
    """True when VENV holds nox NOX_VERSION (read from its metadata, no subprocess)."""
    found = VENV.glob(f"lib/python*/site-packages/nox-{NOX_VERSION}.dist-info/METADATA")
    return NOX.exists() and any(found)


def install_nox() -> None:
    """pip-install the pinned nox into VENV, quietly, unless it is there already."""
    if nox_installed():
        return
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "-q", f"nox=={NOX_VERSION}"], check=False)
    if done.returncode != 0 or not nox_installed():
        raise SetupError(
            f"dev.py: could not install nox=={NOX_VERSION} into {VENV} "
            "(pip says why above); run again when that is fixed"
        )


def main(args: list[str]) -> int:
    """Check the Python, get nox ready and become it; returns only on failure or --help."""
    problem = python_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    try:
        argv = nox_argv(args)
        if argv is None:
            # Asked for (-h): the answer, on stdout. Nothing asked: a mistake, on stderr.
            out = sys.stdout if args else sys.stderr
            print(USAGE.format(version=NOX_VERSION), end="", file=out)
            return 0 if args else 2
        make_venv()
        install_nox()
    except SetupError as error:
        print(error, file=sys.stderr)
        return error.status
    # nox finds noxfile.py in the working directory and runs the sessions from there.
    os.chdir(ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
