"""Load an engine directory and run prefill on it.

The runtime imports nothing from the compiler's upper layers: only the ops (the
AOTInductor package calls fastmmoe::grouped_mm through its proxy executor) and the
manifest. What it accepts is checked here, with errors that say what to fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import ops  # noqa: F401  (registers the ops the compiled backbone calls)
from .manifest import EngineFormatError, read_manifest

BACKBONE_FILE = "backbone.pt2"
DECODE_FILE = "decode.pt2"  # the one-token decode step (export/decode.py), listed in the manifest's "decode"
EMBEDDINGS_FILE = "embeddings.safetensors"


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, vocab]: next-token logits at the last position
    kept_positions: torch.Tensor  # [B, S']: original positions of the tokens that reached the last layer
    cache: list | None = None  # per layer (key, value) [B, heads, S_l, dim]: the tokens that reached layer l
    prompt_length: int | None = None  # S
    next_positions: torch.Tensor | None = None  # [B]: rotary position of each sample's first new token
    # (S, or with multimodal rotary positions their largest + 1); decode continues from here


class Engine:
    front_end = None  # runtime.multimodal.FrontEnd of a VLM engine: vision encoder + input processing
    decode_step = None  # the one-token decode program (runtime/generate.py), None for engines without one

    def __init__(self, backbone: Callable, info: dict, embeddings: torch.Tensor | None = None,
                 manifest: dict | None = None, path: Path | None = None):
        self.backbone = backbone
        self.info = info  # model facts: hidden_size, vocab_size, dtype, ...
        self.embeddings = embeddings
        self.manifest = manifest or {}
        self.path = path

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.info["dtype"])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embeddings is None:
            raise ValueError("this engine was built without its token embeddings; pass inputs_embeds")
        if input_ids.min() < 0 or input_ids.max() >= self.embeddings.shape[0]:
            raise ValueError(f"input_ids must be in [0, {self.embeddings.shape[0]})")
        return torch.nn.functional.embedding(input_ids, self.embeddings)

    @torch.no_grad()
    def prepare(self, images=None, prompts=None, *, chat: bool = True):
        """VLM engines: images (paths, PIL images) + prompts (one "<image>" per image) -> a
        runtime.multimodal.Prepared with input_ids, inputs_embeds and vision_positions."""
        if self.front_end is None:
            raise ValueError(f"this engine was compiled from a text-only {self.info.get('model_type')} model "
                             f"({self.info.get('source')}): it takes input_ids or inputs_embeds, not images and prompts")
        return self.front_end.prepare(self, images, prompts, chat=chat)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                vision_mask: torch.Tensor | None = None,
                vision_positions: torch.Tensor | None = None, rope_positions: torch.Tensor | None = None,
                deepstack: torch.Tensor | None = None, images=None, prompts=None,
                chat: bool = True) -> PrefillResult:
        """Run the prompt. Vision tokens are marked by a [B, S] bool mask or given as [B, N] positions.
        Engines of families with multimodal rotary positions / deepstack features also take
        rope_positions [3, B, S] (default: 0..S-1 on all three) and deepstack [D, B, S, H] (default 0).
        VLM engines also take prompts= (and images=), see prepare()."""
        if _prompts_given(images, prompts, input_ids, inputs_embeds, vision_mask, vision_positions,
                          rope_positions, deepstack):
            prepared = self.prepare(images, prompts, chat=chat)
            if not prepared.batched:
                raise ValueError(f"the prompts tokenize to different shapes (lengths "
                                 f"{[len(x) for x in prepared.input_ids]}): one prefill call takes one shape; "
                                 "use generate_text / engine.generate, which batch them, or prefill them one at a time")
            inputs_embeds, vision_positions = prepared.inputs_embeds, prepared.vision_positions
            rope_positions, deepstack = prepared.rope_positions, prepared.deepstack
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            input_ids = torch.as_tensor(input_ids)
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            inputs_embeds = self.embed(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.info["hidden_size"]:
            raise ValueError(f"inputs_embeds must be [B, S, {self.info['hidden_size']}], got {list(inputs_embeds.shape)}")
        batch, seq = inputs_embeds.shape[:2]
        if seq < 2:
            raise ValueError("the prompt must have at least 2 tokens")
        positions = vision_positions_of(batch, seq, vision_mask, vision_positions)
        extras = self._extra_inputs(batch, seq, rope_positions, deepstack)
        logits, kept, *cache = self.backbone(inputs_embeds.to(self.dtype).contiguous(), positions, *extras)
        pairs = [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)] if cache else None
        if rope_positions is None:
            next_positions = torch.full((batch,), seq, dtype=torch.long)
        else:  # as HF's rope deltas: decode continues after the largest position of the prompt
            next_positions = rope_positions.amax(dim=(0, 2)) + 1
        return PrefillResult(logits, kept, pairs, seq, next_positions)

    def _extra_inputs(self, batch: int, seq: int, rope_positions, deepstack) -> list[torch.Tensor]:
        """The backbone's inputs after the vision positions (MoEFamily.extra_inputs), checked or defaulted."""
        names = self.info.get("extra_inputs", [])
        given = {"rope_positions": rope_positions, "deepstack": deepstack}
        for name, value in given.items():
            if value is not None and name not in names:
                raise ValueError(f"this {self.info.get('model_type')} engine takes no {name}")
        hidden, layers = self.info["hidden_size"], self.info.get("deepstack_layers", 0)
        shapes = {"rope_positions": (3, batch, seq), "deepstack": (layers, batch, seq, hidden)}
        out = []
        for name in names:
            value = given[name]
            if value is None:  # a text-only prompt: plain positions, no visual features
                value = (torch.arange(seq).expand(3, batch, seq) if name == "rope_positions"
                         else torch.zeros(shapes[name], dtype=self.dtype))
            value = torch.as_tensor(value)
            if tuple(value.shape) != shapes[name]:
                raise ValueError(f"{name} must be {list(shapes[name])}, got {list(value.shape)}")
            out.append(value.to(torch.long if name == "rope_positions" else self.dtype).contiguous())
        return out

    def no_decode_message(self) -> str:
        where = f"{self.path}" if self.path else "this engine"
        return (f"{where} has no decode program (compiled before decode existed, with decode=False, or for a "
                "backend without decode): recompile it to decode or generate; prefill still works")

    def start_decode(self, results, max_new_tokens: int):
        """A generate.DecodeState from one or more PrefillResults (their samples in order)."""
        from .generate import DecodeUnavailableError, start_state

        if self.decode_step is None:
            raise DecodeUnavailableError(self.no_decode_message())
        return start_state([results] if isinstance(results, PrefillResult) else list(results), max_new_tokens)

    @torch.no_grad()
    def decode(self, state, input_ids: torch.Tensor | None = None, *,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One token per sample ([B, 1] ids or [B, 1, H] embeddings) -> next-token logits [B, V].
        Appends to `state` (from start_decode) in place."""
        from .generate import DecodeUnavailableError, decode_step

        if self.decode_step is None:
            raise DecodeUnavailableError(self.no_decode_message())
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            input_ids = torch.as_tensor(input_ids)
            if input_ids.dim() == 1:
                input_ids = input_ids[:, None]
            inputs_embeds = self.embed(input_ids)
        return decode_step(self.decode_step, state, inputs_embeds.to(self.dtype))

    def generate(self, input_ids=None, *, inputs_embeds=None, vision_positions=None, vision_mask=None,
                 rope_positions=None, deepstack=None, max_new_tokens: int = 16, eos_token_id=None,
                 stream: bool = False, images=None, prompts=None, chat: bool = True):
        """Greedy generation. Samples: a [B, S] batch or a list of different lengths (ids [S] or
        embeddings [S, H]), each with its own vision tokens ([N] positions or an [S] mask) and, for
        engines that take them, rope_positions ([3, B, S] or [3, S] each) and deepstack ([D, B, S, H]
        or [D, S, H] each). Samples of equal shapes share one prefill call; all share each decode step.
        Returns each sample's new tokens (1-D LongTensors, ending at eos), or with stream=True an
        iterator yielding, per step, a list of each sample's new token (None once it has ended).

        VLM engines: prompts= (one "<image>" per image) and images= instead, as prepare() takes
        them; returns each prompt's answer as text (generation stops at the tokenizer's eos), or
        with stream=True yields per step each prompt's new text piece (runtime.multimodal.stream_texts)."""
        from .generate import generate

        if _prompts_given(images, prompts, input_ids, inputs_embeds, vision_positions, vision_mask,
                          rope_positions, deepstack, eos_token_id):
            from .multimodal import generate_text, stream_texts

            if stream:
                return stream_texts(self, images, prompts, max_new_tokens, chat)
            return generate_text(self, images, prompts, max_new_tokens, chat)

        return generate(self, input_ids, inputs_embeds=inputs_embeds, vision_positions=vision_positions,
                        vision_mask=vision_mask, rope_positions=rope_positions, deepstack=deepstack,
                        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, stream=stream)


def _prompts_given(images, prompts, *tensor_inputs) -> bool:
    """Whether a call takes prompts= (with images=) rather than tensors; refuses a mix of both."""
    if prompts is None and images is None:
        return False
    if prompts is None or any(x is not None for x in tensor_inputs):
        raise ValueError("pass prompts= (with images=) alone, or input_ids/inputs_embeds with vision tokens")
    return True


def vision_positions_of(batch: int, seq: int, mask=None, positions=None) -> torch.Tensor:
    """Validated [B, N] int64 positions from a mask or positions (N may be 0)."""
    if mask is not None and positions is not None:
        raise ValueError("pass vision_mask or vision_positions, not both")
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (batch, seq):
            raise ValueError(f"vision_mask must be [B, S] = [{batch}, {seq}], got {list(mask.shape)}")
        counts = mask.sum(dim=1)
        if (counts != counts[0]).any():
            raise ValueError(
                f"every sample must have the same number of vision tokens, got {counts.tolist()} "
                "(pad samples to equal image-token counts)"
            )
        return mask.nonzero()[:, 1].reshape(batch, int(counts[0])).contiguous()
    if positions is None:
        return torch.zeros(batch, 0, dtype=torch.long)
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.dim() == 1:
        positions = positions[None].expand(batch, -1)
    if positions.dim() != 2 or positions.shape[0] != batch:
        raise ValueError(f"vision_positions must be [B, N] with B = {batch}, got {list(positions.shape)}")
    if positions.numel():
        if positions.min() < 0 or positions.max() >= seq:
            raise ValueError(f"vision_positions must lie in [0, {seq})")
        if (positions[:, 1:] <= positions[:, :-1]).any():
            raise ValueError("vision_positions must be strictly increasing within each sample")
    return positions.contiguous()


def load_engine(path: str | os.PathLike, verify_hashes: bool = True) -> Engine:
    """Load an engine directory written by compile_model / `fastmmoe-compile MODEL --out DIR`."""
    path = Path(path)
    manifest = read_manifest(path, verify_hashes=verify_hashes)
    backend = manifest.get("backend")
    if backend not in ("inductor", "export", "onnx"):
        raise EngineFormatError(f"{path}: unknown backend {backend!r} in the manifest")
    if backend == "onnx":
        from .onnx_runtime import ONNX_FILE

        backbone = load_program(path / ONNX_FILE, backend)
    else:
        backbone = load_program(path / BACKBONE_FILE, backend)
    embeddings = None
    if (path / EMBEDDINGS_FILE).is_file():
        from safetensors.torch import load_file

        embeddings = load_file(str(path / EMBEDDINGS_FILE))["weight"]
    engine = Engine(_as_tuple(backbone), manifest["model"], embeddings, manifest, path)
    if manifest.get("decode"):
        engine.decode_step = load_program(path / manifest["decode"]["file"], backend, decode=True)
    from .multimodal import load_front_end

    engine.front_end = load_front_end(path, manifest)
    return engine


def load_program(file: Path, backend: str, decode: bool = False) -> Callable:
    """One program file of an engine dir as a callable: an AOTInductor package ("inductor"), a
    torch.export archive ("export") or an ONNX model ("onnx": the prefill backbone, or the decode step)."""
    if backend == "inductor":
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(file))
    if backend == "export":
        return torch.export.load(str(file)).module()
    from .onnx_runtime import OrtBackbone, OrtDecodeStep

    return OrtDecodeStep(file) if decode else OrtBackbone(file)


def _as_tuple(fn):
    def call(*args):
        out = fn(*args)
        return tuple(out)

    return call
