"""Reading a checkpoint straight into the target device and dtype, for the adapters that build
their model themselves (DeepSeek-VL2): the modules are built with their parameters on the meta
device (no memory, no random init), then the checkpoint's tensors are read one by one, cast and
placed, and assigned as the parameters (load_state_dict(assign=True)). Peak host memory is then
about one copy of the weights in the target dtype (none on the host for a GPU target), where
building first and loading after held a random fp32 model plus the checkpoint.
Native families get the same from transformers' own from_pretrained (dtype=, device_map=).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device; buffers (rotary tables,
    position ids: often not in the checkpoint) are built for real, on the CPU. Patches
    nn.Module.register_parameter for the duration (as accelerate's init_empty_weights does)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def read_safetensors(files, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> dict:
    """{name: tensor} of every file, each tensor read into `device` (None: the CPU) and cast to
    `dtype` (None: as stored) one at a time: never a second full copy."""
    from safetensors import safe_open

    device = "cpu" if device is None else str(torch.device(device))
    state = {}
    for f in files:
        with safe_open(str(Path(f)), framework="pt", device=device) as reader:
            for name in reader.keys():
                t = reader.get_tensor(name)
                state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def materialize_buffers(module: torch.nn.Module, dtype: torch.dtype | None, device) -> None:
    """The buffers the checkpoint did not hold, onto `device` (floating ones cast to `dtype`, as
    module.to(dtype) would), without touching the already placed parameters."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is None:
                continue
            cast = dtype if dtype is not None and buf.is_floating_point() else buf.dtype
            sub._buffers[name] = buf.to(device=device if device is not None else buf.device, dtype=cast)


def still_on_meta(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers the checkpoint left unset (still on meta)."""
    return [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.device.type == "meta"]
