"""What this machine's CPU can do, read from the CPU itself (never assumed).

bf16 pays on a CPU only with bf16 matrix or vector units: Intel AMX (`amx_bf16`) or AVX512-BF16
(`avx512_bf16`, Intel Cooper Lake and later, AMD Zen 4 and later). Without them bf16 is emulated
through fp32 and is slower than fp32.

Source: Linux `/proc/cpuinfo` ("model name", "flags"), as `lscpu` prints them; elsewhere
`platform.processor()` and no flags (then bf16 is not assumed).

Also: `page_out`, which drops the resident pages of weight files a runtime mapped and no longer reads
(Linux `madvise(2)`).
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


# ------------------------------------------------------------------------------------------------
# Memory: pages of weight files that a runtime mapped and no longer reads

MADV_PAGEOUT = 21  # Linux >= 5.4, <linux/mman.h>: reclaim these pages now (data-safe: a later access reads them again)


def _file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of each file-backed mapping of this process (`/proc/self/maps`); [] off Linux."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(v, 16) for v in parts[0].split("-"))
            out.append((start, end, parts[5].rstrip("\n")))
    return out


def mapped_files() -> frozenset[str]:
    """Paths of the files this process has mapped into memory (Linux; empty elsewhere)."""
    return frozenset(path for _, _, path in _file_mappings())


def page_out(paths: frozenset[str] | set[str]) -> int:
    """Ask the kernel to reclaim the resident pages of this process's mappings of `paths` now
    (`madvise(MADV_PAGEOUT)`), so they stop counting in its resident set.

    For weights a runtime mapped from disk and has since copied into its own layout (OpenVINO
    reorders convolution weights on the first inference and keeps the mapped file as well): the
    mapping stays valid, and a page read again later is read back from the file (the page cache),
    so results never change, only the resident set. Source: Linux `madvise(2)`.

    Returns:
        Bytes of address space advised (0 where unsupported: not Linux, a kernel before 5.4; the
        call is an optimisation, and failures are ignored).
    """
    if not paths:
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return 0
    advised = 0
    for start, end, path in _file_mappings():
        if path in paths and madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
    return advised
