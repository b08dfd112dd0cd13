"""The CPU code paths torch computes on, and which of them this machine can run.

torch picks one vectorised code path for its own kernels when it starts (ATen's CPU
capability: ``default``, ``avx2`` or ``avx512``, lowered with ``ATEN_CPU_CAPABILITY``),
and MKL picks one for its BLAS (capped with ``MKL_ENABLE_INSTRUCTIONS``: ``SSE4_2``,
``AVX2``, ``AVX512``). The same model on the same input rounds differently in the
last bits on different paths, and on one path a batch of rows may round differently
from one row alone: which is why results that are compared bit for bit are checked
on every path a machine can run (docs/adr/0015-batch-invariance.md).

A path is picked by those two environment variables, read once when torch loads, so
running a path means starting a process with them set (:meth:`DispatchPath.env`).
Asking for a path the CPU lacks is not safe: torch then runs instructions the CPU
does not have. :func:`dispatch_paths` says, for each path, why this machine cannot
run it, from the CPU's flags.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ATEN_CAPABILITIES",
    "ATEN_ENV",
    "MKL_ENV",
    "MKL_INSTRUCTIONS",
    "DispatchPath",
    "cpu_flags",
    "cpu_name",
    "describe_current",
    "dispatch_paths",
]

ATEN_ENV = "ATEN_CPU_CAPABILITY"
MKL_ENV = "MKL_ENABLE_INSTRUCTIONS"
#: ATen's CPU capabilities on x86-64, as ``ATEN_CPU_CAPABILITY`` names them, lowest first.
ATEN_CAPABILITIES = ("default", "avx2", "avx512")
#: MKL's instruction sets, as ``MKL_ENABLE_INSTRUCTIONS`` names them, lowest first.
MKL_INSTRUCTIONS = ("SSE4_2", "AVX2", "AVX512")

#: The CPU flags (Linux's /proc/cpuinfo names) each path needs: what torch's own CPU
#: detection asks for before it picks that capability, and what MKL's names stand for.
_NEEDS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "avx2": frozenset({"avx2", "fma"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}),
    "SSE4_2": frozenset({"sse4_2"}),
    "AVX2": frozenset({"avx2", "fma"}),
    "AVX512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}),
}


@dataclass(frozen=True)
class DispatchPath:
    """One ATen capability with one MKL instruction set (None: a torch without MKL)."""

    aten: str
    mkl: str | None

    def env(self) -> dict[str, str]:
        """The environment variables that select this path in a new process."""
        env = {ATEN_ENV: self.aten}
        if self.mkl is not None:
            env[MKL_ENV] = self.mkl
        return env

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.env().items())


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of /proc/cpuinfo; None where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field:
                return value.strip()
    return None


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where there is no such file."""
    flags = _cpuinfo("flags")
    return None if flags is None else frozenset(flags.split())


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _has_mkl() -> bool:
    """Whether the torch installed has MKL (x86-64 builds do)."""
    import torch

    return bool(torch.backends.mkl.is_available())  # type: ignore[no-untyped-call]


def _lacks(name: str, flags: frozenset[str]) -> str | None:
    """Why a CPU with ``flags`` cannot run ``name`` (None: it can)."""
    missing = sorted(_NEEDS[name] - flags)
    return f"{name}: the CPU lacks {', '.join(missing)}" if missing else None


def dispatch_paths(
    flags: frozenset[str] | None = None, *, machine: str | None = None, mkl: bool | None = None
) -> list[tuple[DispatchPath, str | None]]:
    """Every path, with the reason this machine cannot run it (None: it can).

    Args:
        flags: The CPU's flags; by default this machine's (:func:`cpu_flags`).
        machine: ``platform.machine()`` by default; paths are x86-64 ones.
        mkl: Whether torch has MKL; by default, asked of the torch installed.
    """
    machine = platform.machine() if machine is None else machine
    if machine.lower() not in ("x86_64", "amd64"):
        # torch's other architectures have capabilities of their own, and no MKL.
        return [(DispatchPath("default", None), None)]
    flags = cpu_flags() if flags is None else flags
    if mkl is None:
        mkl = _has_mkl()
    sets = MKL_INSTRUCTIONS if mkl else (None,)
    if flags is None:
        # No flags to go by (no /proc/cpuinfo): only the path every CPU has is safe to
        # ask for, with MKL left to pick its own.
        why = "the CPU's flags are unknown here (no /proc/cpuinfo)"
        safe = DispatchPath("default", None)
        others = [DispatchPath(aten, i) for aten in ATEN_CAPABILITIES for i in sets]
        return [(safe, None)] + [(path, why) for path in others if path != safe]
    found: list[tuple[DispatchPath, str | None]] = []
    for aten in ATEN_CAPABILITIES:
        for instructions in sets:
            reasons = [_lacks(aten, flags)]
            if instructions is not None:
                reasons.append(_lacks(instructions, flags))
            why = "; ".join(r for r in reasons if r)
            found.append((DispatchPath(aten, instructions), why or None))
    return found


def describe_current() -> str:
    """This process's path in words, for a log line: the capability torch picked, MKL's
    cap (as the environment set it), and the CPU."""
    import torch

    aten = torch.backends.cpu.get_cpu_capability()
    if _has_mkl():
        mkl = f"{MKL_ENV}={os.environ.get(MKL_ENV) or 'unset'}"
    else:
        mkl = "no MKL"
    return f"ATen {aten}, {mkl}, CPU {cpu_name()!r}"
