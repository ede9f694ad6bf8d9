"""Run a list of passes in order: the rewritten program, each pass's record and the graph diff.
Which passes a configuration asks for is its method's answer (fastmmoe_compile.methods)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch.export import ExportedProgram

from .base import GraphPass
from .diff import diff, summarize


@dataclass
class PassRecord:
    passes: list[dict]  # [{"pass": name, "modified": bool, "changes": [...]}]
    graph_diff: str

    def to_dict(self) -> dict:
        return {"passes": self.passes, "graph_diff": self.graph_diff}


def run_passes(program: ExportedProgram, passes: Sequence[GraphPass]) -> tuple[ExportedProgram, PassRecord]:
    before = summarize(program)
    records = []
    for p in passes:
        result = p(program)
        program = result.program
        records.append({"pass": p.name, "modified": result.modified, "changes": result.changes})
    return program, PassRecord(records, diff(before, summarize(program)))
