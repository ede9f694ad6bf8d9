"""Run an ONNX backbone with ONNX Runtime: the CPU provider, or CUDA where onnxruntime-gpu
and a GPU are both present. Same call as the other backends: torch tensors in, a tuple of
torch tensors out (every output of the graph, in order)."""
from __future__ import annotations

import os

import torch

ONNX_FILE = "backbone.onnx"


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtBackbone:
    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("this engine needs onnxruntime: pip install 'fastmmoe-compile[onnx]' "
                              "(or [onnx-gpu] for CUDA)") from e
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers())
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: a.detach().cpu().contiguous().numpy() for name, a in zip(self.input_names, args, strict=True)}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))
