"""How fast this CPU runs bf16 GEMMs: the one place that decides it, for compile (the CPU engine's
default dtype), load (the warning for a bf16 engine on a slow-bf16 CPU), `fastmmoe-compile env`
and the bf16 benchmark.

A bf16 GEMM on the CPU is fast only where oneDNN has bf16 kernels for it: AVX-512 BF16 or AMX
(x86), the BF16 extension (Arm). Elsewhere it is emulated, and slower than fp32 by a factor of
about 5 (AVX-512 without BF16) to 40 and more (AVX2): benchmarks/RESULTS.md, issue 23's section.

The verdict is a micro-GEMM timed once per process (bf16_speed), not the CPU's feature flags:
the flags say what the silicon has, not what runs. On an AMX machine with oneDNN capped to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2, as a container or a VM may do) the flags still say avx512_bf16 and amx
while bf16 GEMMs run over 100x slower than fp32; with oneDNN capped to AVX512_CORE torch still
reports bf16 as supported (torch.ops.mkldnn._is_mkldnn_bf16_supported) while it runs at 0.2x fp32.
The timing separates the cases by a wide margin (about 4x faster against 0.2x and under 0.01x), and
one thread with the best of several calls keeps a busy neighbour from flipping it (10 of 10 probes
right in each case at load 5-6 on 2 cores). The flags only name the capability in messages.

FASTMMOE_CPU_CAPABILITY (tests, or a user who knows better) overrides it: one of CAPABILITIES;
bf16 is then native exactly for NATIVE_BF16, and nothing is timed.
"""
from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass

import torch

from ..errors import UserInputError

ENV_OVERRIDE = "FASTMMOE_CPU_CAPABILITY"
NATIVE_BF16 = ("AMX_BF16", "AVX512_BF16", "ARM_BF16")  # capabilities with bf16 GEMM kernels
# torch.backends.cpu.get_cpu_capability()'s values, then the bf16 ones this module adds.
CAPABILITIES = ("DEFAULT", "NO AVX", "AVX2", "AVX512", "VSX", "Z VECTOR", "SVE256", *NATIVE_BF16)
# bf16 at least this fraction of fp32's GEMM throughput counts as fast (the measured classes sit at
# about 4x, 0.2x and under 0.01x, far from it on both sides).
FAST_RATIO = 1.0
# What a slow-bf16 CPU costs, for messages where nothing was timed (the override): bf16 over fp32
# GEMM time measured on an AVX2 AMD EPYC (issue 23: 1 against 42 GFLOP/s, one thread).
EXPECTED_SLOWDOWN = 40.0
_PROBE_N = 256  # the micro-GEMM's size: 34 MFLOP, ~20 ms in bf16 on an AVX2 CPU, under 1 ms with AMX


class CpuCapabilityError(UserInputError):
    """FASTMMOE_CPU_CAPABILITY set to something that is not one of CAPABILITIES (bad input: exit 2)."""


class SlowBf16Warning(UserWarning):
    """A bf16 engine compiled for, or loaded on, a CPU whose bf16 GEMMs are slower than fp32."""


@dataclass(frozen=True)
class Bf16Speed:
    """This CPU's bf16 GEMM speed against fp32.

    capability: one of CAPABILITIES (torch's vector ISA, or the bf16 kernels it has).
    native: bf16 GEMMs at least FAST_RATIO times fp32's throughput here.
    fp32_gflops, bf16_gflops: the micro-GEMM's throughput in GFLOP/s (None under the override).
    source: "measured", or "FASTMMOE_CPU_CAPABILITY" (the override; nothing timed)."""
    capability: str
    native: bool
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None
    source: str = "measured"

    @property
    def slowdown(self) -> float | None:
        """bf16 GEMM time over fp32's (>1: bf16 is slower): measured; else EXPECTED_SLOWDOWN for a
        slow-bf16 capability, None for a native one (nothing timed, nothing to warn about)."""
        if self.fp32_gflops and self.bf16_gflops:
            return self.fp32_gflops / self.bf16_gflops
        return None if self.native else EXPECTED_SLOWDOWN

    def describe(self) -> str:
        """One clause, e.g. "this CPU (AVX2) has no native bf16 GEMMs (42x slower than fp32: measured 1.0
        vs 42.0 GFLOP/s on one thread)", or "... (expected about 40x slower than fp32:
        FASTMMOE_CPU_CAPABILITY=AVX2)"."""
        if self.fp32_gflops and self.bf16_gflops:
            how = f"measured {self.bf16_gflops:.1f} vs {self.fp32_gflops:.1f} GFLOP/s on one thread"
        else:
            how = f"{ENV_OVERRIDE}={self.capability}"
        # The flags and the timing disagree where oneDNN is held back (module docstring): say whose word it is.
        cpu = self.capability + (" by its flags" if (self.capability in NATIVE_BF16) != self.native else "")
        if self.native:
            speed = f"{_times(1 / self.slowdown)} fp32's speed" if self.source == "measured" else "faster than fp32"
            return f"this CPU ({cpu}) has native bf16 GEMMs ({speed}: {how})"
        expected = "" if self.source == "measured" else "expected about "
        slower = f"{expected}{_times(self.slowdown)} slower than fp32"
        return f"this CPU ({cpu}) has no native bf16 GEMMs ({slower}: {how})"

    def as_dict(self) -> dict:
        return {"capability": self.capability, "bf16_native": self.native, "fp32_gflops": _round(self.fp32_gflops),
                "bf16_gflops": _round(self.bf16_gflops), "bf16_slowdown": _round(self.slowdown), "source": self.source}


def _times(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def _round(x):
    return None if x is None else round(x, 2)


def hardware_capability() -> str:
    """What the CPU offers for bf16 GEMMs, from its feature flags (one of CAPABILITIES): AMX_BF16,
    AVX512_BF16 or ARM_BF16 where it has those, else torch's vector ISA (AVX2, AVX512, ...). Says
    what the silicon has, not what runs (see the module docstring)."""
    base = torch.backends.cpu.get_cpu_capability()
    flags = getattr(torch, "cpu", None)
    # _onednn_bf16() is False where oneDNN is capped below AVX-512: no bf16 kernel runs then, whatever the flags.
    if platform.machine().lower() in ("x86_64", "amd64") and _onednn_bf16():
        if _flag(flags, "_is_amx_tile_supported") and _flag(flags, "_is_avx512_bf16_supported"):
            return "AMX_BF16"
        if _flag(flags, "_is_avx512_bf16_supported"):
            return "AVX512_BF16"
    elif platform.machine().lower() in ("aarch64", "arm64") and _onednn_bf16():  # on Arm: the BF16 extension
        return "ARM_BF16"
    return base


def _onednn_bf16() -> bool:
    """torch's own "may oneDNN run bf16 here" check: on x86 AVX-512 (with or without BF16) within
    ONEDNN_MAX_CPU_ISA, on Arm the BF16 extension."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _flag(module, name: str) -> bool:
    fn = getattr(module, name, None)  # private torch helpers: absent in some builds
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def _gflops(dtype: torch.dtype, min_reps: int = 5, min_s: float = 0.02) -> float:
    """The best timing of a _PROBE_N^3 matmul in `dtype` (after a warm-up), over at least `min_reps`
    calls and `min_s` seconds, in GFLOP/s. The best, because a busy neighbour only ever adds time."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(_PROBE_N, _PROBE_N, generator=g).to(dtype)
    b = torch.randn(_PROBE_N, _PROBE_N, generator=g).to(dtype)
    best, reps, start = float("inf"), 0, time.perf_counter()
    with torch.no_grad():
        a @ b  # the first call pays oneDNN's kernel selection (JIT)
        while reps < min_reps or time.perf_counter() - start < min_s:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
            reps += 1
    return 2 * _PROBE_N ** 3 / max(best, 1e-9) / 1e9


def measure() -> Bf16Speed:
    """Time fp32 and bf16 micro-GEMMs now, on one thread (a kernel's speed per core: with several
    threads on shared cores one descheduled thread decides the time). Up to 0.1 s where bf16 is
    native, up to 0.7 s where it is not (measured at load 5-6 on 2 cores); no caching, no override
    (bf16_speed() has both)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = _gflops(torch.float32)
        bf16 = _gflops(torch.bfloat16)
        fp32 = max(fp32, _gflops(torch.float32))  # again after bf16: neither dtype alone meets a busy moment
    finally:
        torch.set_num_threads(threads)
    return Bf16Speed(hardware_capability(), bf16 >= FAST_RATIO * fp32, fp32, bf16)


@functools.lru_cache(maxsize=None)
def _measured() -> Bf16Speed:
    return measure()


def bf16_speed() -> Bf16Speed:
    """This CPU's bf16 GEMM speed: FASTMMOE_CPU_CAPABILITY's where set (nothing timed), else a
    micro-GEMM timed once per process (measure()). Raises CpuCapabilityError (a ValueError) for
    an override that is not one of CAPABILITIES."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        capability = override.strip().upper()
        if capability not in CAPABILITIES:
            raise CpuCapabilityError(f"{ENV_OVERRIDE}={override!r} is not one of {', '.join(CAPABILITIES)}")
        return Bf16Speed(capability, capability in NATIVE_BF16, source=ENV_OVERRIDE)
    return _measured()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else platform.processor(), else "unknown"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model Name", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def slow_bf16_message(what: str, advice: str, speed: Bf16Speed | None = None) -> str:
    """One line for a bf16 engine on a slow-bf16 CPU: `what` (e.g. "bfloat16 asked for"), this CPU's
    verdict with the measured or expected bf16 slowdown (Bf16Speed.describe), then `advice`."""
    speed = speed or bf16_speed()
    return f"{what}, but {speed.describe()}; {advice}"
