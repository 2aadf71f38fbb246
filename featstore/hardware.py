"""Which CPU featstore runs on, and the one trap that follows from it: bf16 without native bf16.

bf16 matrix products are fast only where the CPU has them in hardware (x86: AVX512_BF16 or AMX; Arm: the
``bf16`` feature). Elsewhere torch emulates them: on a 2-core AVX2 AMD EPYC, ``encode --precision bf16`` ran
5.5x slower than fp32 on the same images, where a CPU with AVX512_BF16 ran it ~2.2x faster. ``encode`` warns
once about it, and every bench script prints ``capability_line()`` above its figures, so numbers from
different machines are never mixed up.

Nothing here imports torch except ``torch_capability`` (the bench scripts and the CLI's other commands do not
pay for it). ``FEATSTORE_ASSUME_NO_BF16=1`` makes ``native_bf16`` answer no: a testing aid, to see the
warning on a CPU that has bf16.
"""

from __future__ import annotations

import os
import platform
import sys

CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86's two, then aarch64's feature name

_warned = False  # the bf16 warning is printed once per process


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's name, with x86's family and model numbers (a VM may show only "AMD EPYC")."""
    info = _cpuinfo()
    name = info.get("model name") or info.get("hardware") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, aarch64 ``features``); None when they cannot be read."""
    info = _cpuinfo()
    flags = info.get("flags", info.get("features"))
    return None if flags is None else set(flags.split())


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _assume_no_bf16() -> bool:
    return os.environ.get("FEATSTORE_ASSUME_NO_BF16") == "1"


def bf16_flags() -> list[str] | None:
    """The native-bf16 flags this CPU has ([] for none); None when its flags are unknown."""
    if _assume_no_bf16():
        return []
    flags = cpu_flags()
    return None if flags is None else [f for f in BF16_FLAGS if f in flags]


def native_bf16() -> bool:
    """Whether bf16 arithmetic runs natively on this CPU; unknown counts as no."""
    return bool(bf16_flags())


def torch_capability() -> str:
    """The SIMD level torch's CPU kernels dispatch to (e.g. ``AVX2``, ``AVX512``), or ``unknown``."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # no torch, or a torch without the call
        return "unknown"


def cpu_capability() -> dict:
    """{"cpu", "cores", "torch", "native_bf16", "bf16_flags"}: what a benchmark figure depends on."""
    flags = bf16_flags()
    return {"cpu": cpu_model(), "cores": cores(), "torch": torch_capability(),
            "native_bf16": bool(flags), "bf16_flags": flags}


def capability_line(capability: dict | None = None) -> str:
    """One line naming the CPU, e.g. ``cpu: AMD EPYC | 2 cores | torch AVX512 | native bf16: yes (avx512_bf16)``."""
    c = capability or cpu_capability()
    if c["bf16_flags"] is None:
        bf16 = "unknown (no CPU flags), treated as no"
    elif _assume_no_bf16():
        bf16 = "no (assumed: FEATSTORE_ASSUME_NO_BF16=1)"
    else:
        bf16 = f"yes ({', '.join(c['bf16_flags'])})" if c["native_bf16"] else "no"
    return f"cpu: {c['cpu']} | {c['cores']} cores | torch {c['torch']} | native bf16: {bf16}"


def bf16_advice(device_type: str) -> str | None:
    """The warning for bf16 on DEVICE_TYPE, or None where bf16 is not a trap (GPUs, CPUs with native bf16)."""
    if device_type != "cpu" or native_bf16():
        return None
    return (f"--precision bf16 on a CPU without native bf16 ({cpu_model()}, torch {torch_capability()}, no "
            "avx512_bf16 or amx_bf16 flag): bf16 is emulated here, ~5x slower than fp32 (5.5x measured on an "
            "AVX2 EPYC); use --precision fp32 on this CPU (a job that means bf16 sets allow_slow_bf16 = true)")


def warn_slow_bf16(device_type: str, precision: str) -> bool:
    """Print ``bf16_advice`` as one ``featstore: warning:`` line on stderr, once per process; whether it did."""
    global _warned
    advice = bf16_advice(device_type) if precision == "bf16" and not _warned else None
    if advice is None:
        return False
    _warned = True
    print(f"featstore: warning: {advice}", file=sys.stderr)
    return True
