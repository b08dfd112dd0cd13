"""Results compared bit for bit hold within one CPU dispatch path: check them on every one.

torch picks a vectorised code path for its kernels (ATen's CPU capability) and MKL
one for its BLAS; on one machine ``ATEN_CPU_CAPABILITY`` and
``MKL_ENABLE_INSTRUCTIONS`` select the others, down to the plainest. A user's CPU
may take any of them, so the tests of exact and batched decoding run again here,
in a process of their own per path: every path this CPU can execute. A path it
cannot execute is skipped, with the flags it lacks (asking torch for it would run
instructions the CPU does not have).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from protoserve.server.dispatch import DispatchPath, dispatch_paths

#: Set in the child pytest: the path it runs on (and that it must not recurse).
INNER = "PROTOSERVE_TEST_DISPATCH_PATH"
#: The tests whose bit-for-bit results depend on the dispatch path.
PER_PATH = (
    "tests/server/test_bytelm_batching.py",
    "tests/server/test_decoding.py",
    "tests/server/test_under_load.py::"
    "test_32_concurrent_streams_decode_together_and_equal_their_alone_text[invariant]",
    "tests/server/test_oip.py::test_generation_equals_v1_for_each_text_of_a_batch",
)
PATHS = dispatch_paths()


def _run(argv: list[str], path: DispatchPath) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **path.env(), INNER: str(path)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.skipif(bool(os.environ.get(INNER)), reason="already inside a run on one path")
@pytest.mark.parametrize(("path", "why"), PATHS, ids=[str(p) for p, _ in PATHS])
def test_exact_and_batched_decoding_hold_on_every_dispatch_path(
    path: DispatchPath, why: str | None
) -> None:
    if why:
        pytest.skip(f"{path}: {why}")
    # torch runs on the capability asked for (it would fall back in silence otherwise).
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    got = _run([sys.executable, "-c", probe], path)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().lower() == path.aten, got.stdout
    tests = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PER_PATH], path)
    assert tests.returncode == 0, f"{path}:\n{tests.stdout[-6000:]}\n{tests.stderr[-2000:]}"
    assert " passed" in tests.stdout.splitlines()[-1], tests.stdout[-2000:]
