"""Reading a checkpoint straight into the target device and dtype, for the adapters that build
their model themselves (DeepSeek-VL2): the modules are built with their parameters on the meta
device (no memory, no random init), then the checkpoint's tensors are read one by one, cast and
placed, and assigned as the parameters (load_state_dict(assign=True)). Peak host memory is then
about one copy of the weights in the target dtype (none on the host for a GPU target), where
building first and loading after held a random fp32 model plus the checkpoint.
Native families get the same from transformers' own from_pretrained (dtype=, device_map=),
with its safetensors reads done in order by pread rather than ahead by mmap on the CPU (one_host_copy).
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


# safetensors' read backends (safe_open(..., backend=)): "mmap" (its default) or "pread".
HOST_BACKEND = "pread"


def host_backend(device: str) -> dict:
    """safe_open's keywords for reading onto `device` ("cpu", "cuda", ...): pread for the CPU.

    Why: an mmap-backed read leaves every page it touched resident in this process (and counted
    in its RSS) for as long as any tensor still views the mapping. transformers keeps the tensors
    it needs no conversion for as views of the mapping, so after loading a checkpoint whose
    experts it fuses (qwen3_moe: per-expert matrices -> one [E, 2I, H] tensor) the process held
    the fused copy *and* the whole file's mapped pages: 2.1x the checkpoint in peak RSS
    (benchmarks/bench_load_rss.py, RESULTS.md). pread copies each tensor into memory of its own
    and leaves the file in the page cache, which the kernel can drop."""
    return {"backend": HOST_BACKEND} if torch.device(device).type == "cpu" else {}


def one_host_copy(device: str | torch.device | None):
    """A context for transformers' from_pretrained loading for a CPU target (`device` None or "cpu"):
    its safetensors files read with pread instead of mmap (see host_backend), one tensor at a time
    as its conversions ask for them rather than by a thread pool that reads them all ahead: with
    pread, reading ahead holds every per-expert piece beside the fused tensors (1.9x the checkpoint
    measured); in order, peak RSS is about one copy plus one layer's pieces. For another device
    nothing changes (each tensor goes to the device as read). How transformers is made to read so
    is a touch point on its internals: transformers_compat.safetensors_reads."""
    from ..transformers_compat import safetensors_reads

    if device is not None and torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return safetensors_reads(HOST_BACKEND)


def read_safetensors(files, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> dict:
    """{name: tensor} of every file, each tensor read into `device` (None: the CPU) and cast to
    `dtype` (None: as stored) one at a time: never a second full copy (and, on the CPU, read
    with pread: no mapping of the file left resident, see host_backend)."""
    from safetensors import safe_open

    device = "cpu" if device is None else str(torch.device(device))
    state = {}
    for f in files:
        with safe_open(str(Path(f)), framework="pt", device=device, **host_backend(device)) as reader:
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


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def stored_dtype(path: str) -> torch.dtype | None:
    """The floating dtype a local checkpoint directory loads in by default (what from_pretrained's
    dtype="auto" gives): config.json's "dtype" (or the older "torch_dtype"), else the dtype of most
    floating tensors in its first *.safetensors file's header. None where neither says (a hub id, a
    .bin-only checkpoint, an unreadable file): the caller then keeps the loader's own default.
    Reads only config.json and one header (a few KiB), no tensor."""
    import json
    import struct

    root = Path(path)
    if not root.is_dir():
        return None
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        return None
    try:
        with open(files[0], "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(size, 100 * 2 ** 20)))  # a header is KiBs; never read a whole file
    except (OSError, ValueError, struct.error):
        return None
    counts: dict = {}
    for key, entry in header.items():
        floating = key != "__metadata__" and isinstance(entry, dict)
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if floating else None
        if dtype is not None:
            counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None
