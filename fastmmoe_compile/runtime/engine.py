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
EMBEDDINGS_FILE = "embeddings.safetensors"


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, vocab]: next-token logits at the last position
    kept_positions: torch.Tensor  # [B, S']: original positions of the tokens that reached the last layer


class Engine:
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
    def prefill(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                vision_mask: torch.Tensor | None = None,
                vision_positions: torch.Tensor | None = None) -> PrefillResult:
        """Run the prompt. Vision tokens are marked by a [B, S] bool mask or given as [B, N] positions."""
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
        logits, kept = self.backbone(inputs_embeds.to(self.dtype).contiguous(), positions)
        return PrefillResult(logits, kept)


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
    if backend == "inductor":
        from torch._inductor import aoti_load_package

        backbone = aoti_load_package(str(path / BACKBONE_FILE))
    elif backend == "export":
        backbone = torch.export.load(str(path / BACKBONE_FILE)).module()
    else:
        raise EngineFormatError(f"{path}: unknown backend {backend!r} in the manifest")
    embeddings = None
    if (path / EMBEDDINGS_FILE).is_file():
        from safetensors.torch import load_file

        embeddings = load_file(str(path / EMBEDDINGS_FILE))["weight"]
    return Engine(_as_tuple(backbone), manifest["model"], embeddings, manifest, path)


def _as_tuple(fn):
    def call(*args):
        out = fn(*args)
        return tuple(out)

    return call
