"""What an operator reads when the server starts: no warnings, the address, the model ready."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.e2e


def test_startup_log_is_clean(served: ServerProcess) -> None:
    log = served.output()
    assert f"serving gRPC on 127.0.0.1:{served.port}" in log
    assert "model bytelm ready" in log
    assert "Warning" not in log and "Traceback" not in log, log
