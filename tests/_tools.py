"""What a test needs from outside its Python: there, skipped for want of it, or failed on CI.

`nox -s tests` installs everything the suite uses (README, "Run it"), so under CI a
missing tool is a broken install step and fails the test that needs it; on a
developer's machine the test skips, saying what is missing. CI is on when the `CI`
environment variable is set to anything but "", "0", "false" or "no"; `.ci/run` sets
it, and `CI=1 python3 dev.py tests` asks the same of a local run.

The one other kind of skip, on CI as anywhere, is not for a tool: a bit-for-bit comparison
under a CPU dispatch path this machine cannot execute (tests/server/test_dispatch_paths.py,
and the exact batched step in tests/server/test_bytelm_batching.py).
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def on_ci() -> bool:
    """Whether this run is CI's (or asks for CI's rules): $CI set to a true value."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(message: str) -> NoReturn:
    """Skip the test for want of what `message` names; fail it under CI."""
    # Hidden from the traceback, so that the skip or failure reports the test's own line.
    __tracebackhide__ = True
    if on_ci():
        pytest.fail(f"{message}; under CI (CI is set) the test run must provide it", pytrace=False)
    pytest.skip(message)


def which(*names: str, install: str) -> str:
    """Path of the first of `names` on PATH; else `missing`, saying how to `install` one."""
    __tracebackhide__ = True
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    missing(f"{' or '.join(names)} is not installed ({install})")


def debian(command: str, package: str) -> str:
    """Path of `command` from Debian's `package`, which `nox -s tests` installs (as root)."""
    __tracebackhide__ = True
    return which(command, install=f"Debian's {package}: nox -s tests installs it with apt-get")


def chromium() -> str:
    """Headless Chromium, for the tests that load a page in a real browser."""
    __tracebackhide__ = True
    return debian("chromium", "chromium")
