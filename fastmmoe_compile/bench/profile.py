"""Where an eager prefill spends its time: the token-reduction machinery's share (torch.profiler)."""
from __future__ import annotations

import time

import torch

from .options import CLONE_RANGE, MERGE_OPS, SDPA_CPU


def _range_enter(name):
    rf = torch.autograd.profiler.record_function(name)
    rf.__enter__()
    return rf


def _range_exit(rf, *after):
    rf.__exit__(None, None, None)


def mark_router_clones(gm: torch.fx.GraphModule) -> int:
    """Wrap each cloned router chain (the nodes that compute merge_tokens' routing
    distributions from the pre-merge stream) in a profiler range; returns how many."""
    def ancestors(node):
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(n.all_input_nodes)
        return seen

    graph, wrapped = gm.graph, 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for merge in [n for n in graph.nodes if n.target == torch.ops.fastmmoe.merge_tokens.default]:
        residual, probs = merge.args[0], merge.args[1]
        if probs is None:
            continue  # FastV: no router
        chain = [n for n in ancestors(probs) - ancestors(residual) if n.op == "call_function"]
        if not chain:
            continue
        chain.sort(key=order.__getitem__)
        with graph.inserting_before(chain[0]):
            handle = graph.call_function(_range_enter, (CLONE_RANGE,))
        with graph.inserting_after(chain[-1]):
            graph.call_function(_range_exit, (handle, chain[-1]))
        wrapped += 1
    gm.recompile()
    return wrapped


def merge_share(program, inputs, rows: int = 0) -> dict:
    """One profiled eager prefill: time in the merge machinery / the whole prefill."""
    from torch.profiler import ProfilerActivity, profile

    gm = program.module()
    clones = mark_router_clones(gm)
    with torch.no_grad():
        gm(*inputs)  # warm (first-call allocations)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            gm(*inputs)
            wall = time.perf_counter() - t
    by_key = {e.key: e for e in prof.key_averages()}
    total_of = lambda k: by_key[k].cpu_time_total / 1e6 if k in by_key else 0.0  # noqa: E731
    parts = {k: total_of(k) for k in (*MERGE_OPS, CLONE_RANGE)}
    calls = {k: by_key[k].count if k in by_key else 0 for k in (*MERGE_OPS, CLONE_RANGE)}
    total = sum(parts.values())
    # Where the rest goes: expert GEMMs, attention kernel, the other matmuls, everything else.
    experts, attention = total_of("fastmmoe::grouped_mm"), total_of(SDPA_CPU)
    mm = by_key["aten::mm"].self_cpu_time_total / 1e6 if "aten::mm" in by_key else 0.0
    grouped_inner = by_key["aten::_grouped_mm"].cpu_time_total / 1e6 if "aten::_grouped_mm" in by_key else 0.0
    categories = {"expert_gemm": experts, "attention": attention, "dense_mm": max(0.0, mm - grouped_inner),
                  "merge": total}
    categories["other"] = max(0.0, wall - sum(categories.values()))
    out = {"wall_s": wall, "merge_s": total, "share": total / wall, "parts_s": parts, "calls": calls,
           "router_clones": clones, "categories_s": categories}
    if rows:
        out["table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return out


def print_profile(shares: dict, reports: dict) -> None:
    if not shares:
        return
    reduced = {n: s for n, s in shares.items() if n not in ("unmodified", "topkv")}
    if reduced:
        print("\nMerge machinery (eager, torch.profiler, ms): " + "; ".join(
            f"{n}: " + ", ".join(f"{k.split('::')[1]} {v * 1e3:.1f}" for k, v in s["parts_s"].items())
            + f" of {s['wall_s'] * 1e3:.0f}" for n, s in reduced.items()))
    cats = list(next(iter(shares.values()))["categories_s"])
    print("\nProfiled eager prefill by part, ms (FLOPs share of the analytic count in brackets):\n")
    print("| variant | " + " | ".join(cats) + " | total |")
    print("|---" * (len(cats) + 2) + "|")
    for n, s in shares.items():
        bp = reports[n].by_part
        fl = {"expert_gemm": bp["routed"], "attention": bp["attn_core"],
              "dense_mm": bp["attn_proj"] + bp["router"] + bp["dense"] + bp["lm_head"], "merge": bp["merge"]}
        tot = reports[n].total
        print(f"| {n} | " + " | ".join(
            f"{s['categories_s'][c] * 1e3:.0f}" + (f" ({fl[c] / tot * 100:.0f}%)" if c in fl else "")
            for c in cats) + f" | {s['wall_s'] * 1e3:.0f} |")
    for n, s in shares.items():
        if "table" in s:
            print(f"\n### profile: eager {n}\n\n{s['table']}")
