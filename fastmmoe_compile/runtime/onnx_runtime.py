"""Run an engine's ONNX programs with ONNX Runtime: the CPU provider, or CUDA where
onnxruntime-gpu and a GPU are both present. Same calls as the other backends, torch tensors
in and out:
- OrtBackbone (backbone.onnx): every output of the prefill graph, in order, as a tuple.
- OrtDecodeStep (decode.onnx): the decode program's call (export/decode.py), so that
  runtime/generate.py drives it exactly as it drives the exported or AOTInductor step.
"""
from __future__ import annotations

import os

import numpy as np
import torch

ONNX_FILE = "backbone.onnx"
DECODE_ONNX_FILE = "decode.onnx"

_ELEMENT = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
            torch.int32: np.int32, torch.bool: np.bool_}


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("this engine needs onnxruntime: pip install 'fastmmoe-compile[onnx]' "
                          "(or [onnx-gpu] for CUDA)") from e
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers())


class OrtBackbone:
    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.session = _session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: a.detach().cpu().contiguous().numpy() for name, a in zip(self.input_names, args, strict=True)}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))


class OrtDecodeStep:
    """(inputs_embeds [B, 1, H], position_ids [B, 1], keys, values, masks) -> (logits [B, V], new_keys, new_values),
    per layer lists as in export/decode.DecodeStep.

    Nothing is copied on the way in or out: every input is bound to ORT by its torch tensor's memory
    (the runtime's `buffer[:L]` cache views are contiguous), and ORT writes the logits and new K/V
    rows straight into torch tensors allocated here (IOBinding)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.session = _session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.layers = (len(self.output_names) - 1) // 2
        vocab = self.session.get_outputs()[0].shape[-1]
        if not isinstance(vocab, int) or len(self.input_names) != 2 + 3 * self.layers:
            raise ValueError(f"{path} is not a decode step (export/decode.py): inputs {self.input_names}")
        self.vocab = vocab

    def __call__(self, inputs_embeds, position_ids, keys: list, values: list, masks: list):
        if not (len(keys) == len(values) == len(masks) == self.layers):
            raise ValueError(f"expected {self.layers} layers of keys, values and masks")
        # Held here until the run ends: ORT reads their memory (.contiguous() is a no-op on the runtime's views).
        inputs = [t.detach().contiguous() for t in (inputs_embeds, position_ids, *keys, *values, *masks)]
        batch = inputs_embeds.shape[0]
        logits = inputs_embeds.new_empty(batch, self.vocab)
        # New rows: [B, heads, 1, dim], the heads and dim of that layer's cache [L, B, heads, dim].
        new_keys = [k.new_empty(batch, k.shape[2], 1, k.shape[3]) for k in keys]
        new_values = [v.new_empty(batch, v.shape[2], 1, v.shape[3]) for v in values]
        binding = self.session.io_binding()
        for name, t in zip(self.input_names, inputs, strict=True):
            _bind(binding.bind_input, name, t)
        for name, t in zip(self.output_names, [logits, *new_keys, *new_values], strict=True):
            _bind(binding.bind_output, name, t)
        self.session.run_with_iobinding(binding)
        return logits, new_keys, new_values


def _bind(bind, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _ELEMENT:
        raise TypeError(f"{name}: ONNX Runtime binding for {t.dtype} is not supported here")
    bind(name, t.device.type, t.device.index or 0, _ELEMENT[t.dtype], list(t.shape), t.data_ptr())
