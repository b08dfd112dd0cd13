"""docs/architecture.md, rule 3: the gateway is generic and never imports protoserve.server."""

from __future__ import annotations

import subprocess
import sys


def test_building_the_gateway_imports_nothing_of_the_server() -> None:
    code = (
        "import sys\n"
        "from protoserve.gateway import build_gateway\n"
        "import protoserve.gateway.cli\n"
        "build_gateway('127.0.0.1:1')\n"
        "leaked = sorted(m for m in sys.modules if m.startswith('protoserve.server'))\n"
        "assert not leaked, leaked\n"
        "assert 'torch' not in sys.modules, 'the gateway must not pay for importing torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
