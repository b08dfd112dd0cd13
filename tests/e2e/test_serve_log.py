"""What an operator reads when the server starts: no warnings, the address, the model ready,
and how its generations decode."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.e2e


def test_startup_log_is_clean(served: ServerProcess) -> None:
    log = served.output()
    assert f"serving gRPC on 127.0.0.1:{served.port}" in log
    assert "model bytelm ready" in log
    assert (
        "model bytelm: generations decode batched, up to 32 per step; each gets its lone "
        "tokens to float rounding (--batch-invariant: bit for bit)"
    ) in log
    assert "Warning" not in log and "Traceback" not in log, log
