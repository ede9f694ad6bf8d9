"""`fastmmoe-compile env`: what this machine offers the compiler, for bug reports (as
`python -m torch.utils.collect_env` and `vllm collect-env` are for theirs).

collect() gathers it as one JSON-able dict; format_env() lays it out on one screen. Every probe
is guarded: a package that is missing or fails to import is reported as such (with the error's
first line), never raised, because a broken installation is what a bug report is for. The CPU's
bf16 facts come from runtime/cpu.py (the module that decides the CPU engine's default dtype);
which backend can target which device comes from the backend table (lower/backends.py).
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys

import torch

from . import __version__
from .lower.backends import BACKENDS
from .runtime.cpu import bf16_speed, cpu_model
from .runtime.device import DEVICES, cuda_missing_reason

# Versions reported (module name -> what it is for); the first three always, the rest where installed.
PACKAGES = ("transformers", "onnxruntime", "onnx", "onnxscript", "triton", "tensorrt")
CXX_CANDIDATES = ("g++", "c++", "clang++")  # what Inductor's C++ compiler search tries (with $CXX first)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def package(name: str) -> dict:
    """{"version": str} of an importable module, else {"version": None, "error": why} (one line)."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # ImportError, or whatever a broken install raises on import
        return {"version": None, "error": _first_line(e)}
    return {"version": str(getattr(module, "__version__", "unknown"))}


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would find for CPU code (AOTInductor needs one): $CXX or the first
    of CXX_CANDIDATES on PATH; None without one."""
    for name in ([os.environ["CXX"]] if os.environ.get("CXX") else []) + list(CXX_CANDIDATES):
        if shutil.which(name):
            return name
    return None


def gpus() -> list[dict]:
    """Each visible CUDA GPU: name, memory in GiB, compute capability; [] without CUDA."""
    if cuda_missing_reason() is not None:
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                    "capability": f"{p.major}.{p.minor}"})
    return out


def backends(packages: dict) -> dict:
    """{backend: {device: None where it can compile and run here, else why not (one clause)}} for
    every registered backend and device: the backend's own requirement first (an extra, a tool it
    needs), then whether it targets the device, then whether this machine has the device."""
    cuda_why = cuda_missing_reason()
    out = {}
    for name, backend in BACKENDS.items():
        needs = _requirement(backend)
        row = {}
        for device in DEVICES:
            why = needs or backend.devices.get(device, f"does not target {device}")
            if why is None and device == "cuda":
                why = cuda_why or (f"triton is not importable ({packages['triton']['error']})"
                                   if name == "inductor" and packages["triton"]["version"] is None else None)
            if why is None and device == "cpu" and name == "inductor" and cpp_compiler() is None:
                why = f"no C++ compiler ($CXX or {', '.join(CXX_CANDIDATES)} on PATH), which AOTInductor needs"
            row[device] = why
        out[name] = row
    return out


def _requirement(backend) -> str | None:
    """Why `backend` cannot run here on any device (its require() failing: a missing extra, a
    backend not built yet), or None."""
    try:
        backend.require()
    except Exception as e:  # BackendError and friends: their message is the reason
        return str(e).split("\n")[0]
    return None


def collect() -> dict:
    """Everything `fastmmoe-compile env` reports, as one JSON-able dict. Times the CPU's bf16
    micro-GEMM once (runtime.cpu.bf16_speed: up to ~1 s). Raises nothing for a missing package."""
    packages = {name: package(name) for name in PACKAGES}
    if packages["onnxruntime"]["version"] is not None:
        try:
            import onnxruntime

            packages["onnxruntime"]["providers"] = list(onnxruntime.get_available_providers())
        except Exception as e:
            packages["onnxruntime"]["providers_error"] = _first_line(e)
    try:
        speed = bf16_speed().as_dict()
    except ValueError as e:  # a malformed FASTMMOE_CPU_CAPABILITY: report it, as everything else
        speed = {"error": str(e)}
    return {
        "fastmmoe_compile": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "os": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "debug": bool(torch.version.debug)},
        "packages": packages,
        "cpu": {"model": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
                **speed},
        "cuda": {"available": cuda_missing_reason() is None, "reason": cuda_missing_reason(), "gpus": gpus()},
        "cpp_compiler": cpp_compiler(),
        "backends": backends(packages),
    }


def format_env(env: dict) -> str:
    """collect()'s dict as a one-screen text report (about 25 lines)."""
    lines = [f"fastmmoe-compile {env['fastmmoe_compile']}",
             f"  python        {env['python']['version']} ({env['python']['executable']})",
             f"  os            {env['os']}"]
    t = env["torch"]
    lines.append(f"  torch         {t['version']} (CUDA {t['cuda'] or 'none: a CPU-only build'})")
    for name, p in env["packages"].items():
        if p["version"] is None:
            shown = "not installed" if "No module named" in p["error"] else f"not importable ({p['error']})"
        else:
            shown = p["version"] + (f" (providers: {', '.join(p['providers'])})" if p.get("providers") else "")
        lines.append(f"  {name:<13} {shown}")
    c = env["cpu"]
    lines += ["CPU",
              f"  model         {c['model']} ({c['machine']}, {c['cores']} cores, torch threads {c['torch_threads']})"]
    if "error" in c:
        lines.append(f"  bf16          unknown: {c['error']}")
    else:
        lines.append(f"  capability    {c['capability']} (torch's vector ISA: {c['torch_capability']})")
        if c["fp32_gflops"] is not None:
            how = f"measured {c['bf16_gflops']:.1f} vs fp32 {c['fp32_gflops']:.1f} GFLOP/s, 1 thread"
        else:
            how = f"set by {c['source']}"
        ratio = c["bf16_slowdown"]
        speed = f"{1 / ratio:.1f}x fp32's speed" if ratio <= 1 else f"{ratio:.0f}x slower than fp32"
        verdict = "native" if c["bf16_native"] else "NOT native"
        lines.append(f"  bf16 GEMMs    {verdict}: {speed} ({how})")
        lines.append("  CPU engines   a bf16 checkpoint compiles to " +
                     ("bfloat16 (its own dtype)" if c["bf16_native"] else "float32 (--dtype bfloat16 to keep bf16)"))
    cuda = env["cuda"]
    lines.append("GPUs")
    if not cuda["gpus"]:
        lines.append(f"  none: {cuda['reason'] or 'no device visible'}")
    for g in cuda["gpus"]:
        lines.append(f"  cuda:{g['index']}        {g['name']}, {g['memory_gib']} GiB, "
                     f"compute capability {g['capability']}")
    lines.append("Backends (compile and run here)")
    for name, row in env["backends"].items():
        for device, why in row.items():
            lines.append(f"  {name + ' / ' + device:<18} {'yes' if why is None else 'no: ' + why}")
    return "\n".join(lines)
