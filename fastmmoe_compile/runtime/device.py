"""Where an engine runs: the device names, the checks that say what to do when one is missing,
and the program boundary that moves the runtime's host-side inputs onto the engine's device.

An engine is compiled for one device ("cpu" or "cuda"); manifest["device"] records it and
load_engine runs it there. On CUDA the weights, the prefill and decode programs' outputs and
the KV cache (runtime/generate.py allocates its buffers like the prefill's cache) stay on the
GPU. The token-embedding table stays on the host (a lookup per prompt, token ids move to it), and
so does the front end's input processing: the inputs the runtime builds there (embeddings,
positions, masks, pixel values) are copied in once per program call, and a vision encoder's
features come back to the host, where the front end places them among the prompt's tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map

from ..errors import UserInputError

DEVICES = ("cpu", "cuda")
# None: decided per checkpoint and CPU (api.choose_dtype: the checkpoint's own, float32 where a bf16
# checkpoint meets a CPU without native bf16 GEMMs, runtime/cpu.py).
DEFAULT_DTYPE = {"cpu": None, "cuda": torch.bfloat16}


class DeviceError(UserInputError):
    """A device that is not one of DEVICES, or one this machine does not have, or an engine
    loaded on another device than it was compiled for (bad input: exit 2 from the CLI)."""


def device_name(device) -> str:
    """"cpu" or "cuda" from a str or torch.device ("cuda:0" is "cuda"). Raises DeviceError."""
    name = device.type if isinstance(device, torch.device) else device
    if isinstance(name, str) and name.startswith("cuda:") and name[5:].isdigit():
        name = "cuda"
    if name not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    return name


def cuda_missing_reason() -> str | None:
    """None where CUDA runs here, else why not (one clause)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def require_device(device, what: str = "compiling for --device cuda") -> str:
    """The device's name, after checking this machine has it; DeviceError with what to do otherwise."""
    name = device_name(device)
    if name == "cuda":
        reason = cuda_missing_reason()
        if reason is not None:
            raise DeviceError(f"{what} needs a CUDA GPU and a CUDA build of torch, but {reason}: run on a GPU "
                              "machine, or use --device cpu / device=\"cpu\"")
    return name


def engine_device(path, compiled_for, requested=None) -> str:
    """The device to load an engine on: its manifest's ("cpu" when absent), checked against
    `requested` (None: the manifest's) and against this machine. Raises DeviceError."""
    compiled_for = "cpu" if compiled_for is None else compiled_for
    if compiled_for not in DEVICES:
        raise DeviceError(f"{path}: manifest field device is {compiled_for!r}; expected one of {', '.join(DEVICES)} "
                          "(a corrupt or hand-edited manifest: recompile the model)")
    if requested is not None and device_name(requested) != compiled_for:
        flag = "--device " + device_name(requested)
        raise DeviceError(f"{path} was compiled for {compiled_for}, not {device_name(requested)}: load it with "
                          f"device={compiled_for!r}, or recompile the model with {flag}")
    if compiled_for == "cuda":
        reason = cuda_missing_reason()
        if reason is not None:
            raise DeviceError(f"{path} was compiled for cuda, but {reason}: load it on a machine with a CUDA GPU, "
                              "or recompile the model with --device cpu")
    return compiled_for


def to_device(tree, device: torch.device):
    """Every tensor in a (nested) argument structure, on `device` (the ones already there untouched)."""
    return tree_map(lambda x: x.to(device, non_blocking=True)
                    if isinstance(x, torch.Tensor) and x.device != device else x, tree)


def on_device(fn: Callable | None, device, outputs_to_host: bool = False) -> Callable | None:
    """`fn` (a program) with its tensor inputs moved to `device`; the identity on the CPU.
    outputs_to_host: also bring its outputs back (a vision encoder, whose features the front end
    scatters into host-side token rows)."""
    device = torch.device(device)
    if fn is None or device.type == "cpu":
        return fn

    def call(*args):
        out = fn(*to_device(args, device))
        return to_device(out, torch.device("cpu")) if outputs_to_host else out

    call.program = fn  # the wrapped program, for inspection
    return call
