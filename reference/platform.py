"""What this machine's CPU can do, read from the CPU itself (never assumed).

bf16 pays on a CPU only with bf16 matrix or vector units: Intel AMX (`amx_bf16`) or AVX512-BF16
(`avx512_bf16`, Intel Cooper Lake and later, AMD Zen 4 and later). Without them bf16 is emulated
through fp32 and is slower than fp32.

Source: Linux `/proc/cpuinfo` ("model name", "flags"), as `lscpu` prints them; elsewhere
`platform.processor()` and no flags (then bf16 is not assumed).
"""

from __future__ import annotations

import functools
import platform

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
               "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    """The CPU's model name (e.g. "AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+")."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where they cannot be read)."""
    return _cpuinfo()[1]


def bf16_units() -> tuple[str, ...]:
    """The bf16 units this CPU has, among `BF16_FLAGS` (empty: none, bf16 would be emulated)."""
    return tuple(f for f in BF16_FLAGS if f in cpu_flags())


def cpu_summary() -> str:
    """One line for benchmark tables and run summaries: model, cores, the flags that matter."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    shown = [f for f in SHOWN_FLAGS if f in cpu_flags()]
    units = ", ".join(bf16_units()) or "none (bf16 emulated)"
    return f"{cpu_model()}, {cores} cores; flags: {' '.join(shown) or '-'}; bf16 units: {units}"
