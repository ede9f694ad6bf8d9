"""The pass pipeline a FastMMoEConfig asks for, in order, with its record and graph diff."""
from __future__ import annotations

from dataclasses import dataclass

from torch.export import ExportedProgram

from ..config import FastMMoEConfig, FastVConfig, SparseVLMConfig
from .base import GraphPass
from .diff import diff, summarize
from .modality_topk import ModalityTopK
from .sparsevlm import SparseVLM
from .token_reduction import TokenReduction


@dataclass
class PassRecord:
    passes: list[dict]  # [{"pass": name, "modified": bool, "changes": [...]}]
    graph_diff: str

    def to_dict(self) -> dict:
        return {"passes": self.passes, "graph_diff": self.graph_diff}


def build_passes(config: FastMMoEConfig | FastVConfig | SparseVLMConfig) -> list[GraphPass]:
    if isinstance(config, FastVConfig):
        return [TokenReduction(config.stages(), name="fastv")]
    if isinstance(config, SparseVLMConfig):
        return [SparseVLM(config.stages())]
    stages = config.stages()
    passes: list[GraphPass] = [ModalityTopK(config.reduce_from_layer, config.kv,
                                            fresh_until_layer=stages[0].layer if stages else None)]
    if stages:
        passes.append(TokenReduction(stages, name="routing_merge"))
    return passes


def apply_passes(program: ExportedProgram, config: FastMMoEConfig | FastVConfig | SparseVLMConfig) -> tuple[ExportedProgram, PassRecord]:
    before = summarize(program)
    records = []
    for p in build_passes(config):
        result = p(program)
        program = result.program
        records.append({"pass": p.name, "modified": result.modified, "changes": result.changes})
    return program, PassRecord(records, diff(before, summarize(program)))
