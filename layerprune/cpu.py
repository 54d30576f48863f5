"""The CPU this runs on, as int8 kernels see it: torch-free, for export (which int8 weights to write) and
for the server (whether the bundle's int8 weights compute here what they computed when validated)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """'avx512-vnni', 'avx512', 'avx2', 'arm64', 'ppc64le', or what platform.machine() says (e.g. x86
    without AVX2)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if machine == "ppc64le":
        return "ppc64le"
    if machine not in ("x86_64", "amd64", "i686", "i386"):
        return machine or "unknown"
    flags = _cpu_flags(cpuinfo)
    if "avx512f" in flags and "avx512bw" in flags:  # the byte/word ops int8 GEMM kernels need
        return "avx512-vnni" if "avx512_vnni" in flags else "avx512"
    if "avx2" in flags:
        return "avx2"
    return f"{machine} without avx2"


def serves_int8_of(built_for: str, cpu: str | None = None) -> bool:
    """Whether int8 weights quantized for CPU kind `built_for` compute on `cpu` (default: this one) what they
    computed where they were validated. 8-bit u8 x s8 weights saturate the int16 pair sums of every x86
    kernel but VNNI's, so they serve only on VNNI; 7-bit weights and other architectures' presets are safe."""
    cpu = cpu or cpu_kind()
    return built_for != "avx512-vnni" or cpu == "avx512-vnni"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and int8 kind, e.g. 'AMD EPYC (avx2)': to name beside every figure measured."""
    name = platform.processor() or platform.machine()
    try:
        name = next(line.partition(":")[2].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({cpu_kind(cpuinfo)})"


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
