"""Results: rows, the markdown table, results.json and the plots."""
from __future__ import annotations

import json
import statistics
from pathlib import Path



def result_rows(args, configs, reports, times, decode_times, shares, num_layers) -> list[dict]:
    from fastmmoe_compile import flops

    def base_of(lowering, measured):
        # Against the unmodified program of the same lowering; the transformers row is compared
        # with the compiled unmodified backbone (the reference), eager without compile.
        if lowering != "transformers":
            return (lowering, "unmodified")
        return ("compiled" if ("compiled", "unmodified") in measured else "eager", "unmodified")

    base_flops = reports["unmodified"].total
    rows = []
    for (lowering, name), ts in times.items():
        base_key = base_of(lowering, times)
        med, base = statistics.median(ts), statistics.median(times[base_key])
        fr = base_flops / reports[name].total
        row = {"lowering": lowering, "variant": name, "config": configs[name].to_dict(),
               "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "all_ms": [t * 1e3 for t in ts],
               "speedup": base / med, "speedup_min": min(times[base_key]) / min(ts),
               "flops": reports[name].total, "flops_ratio": fr, "efficiency": base / med / fr,
               "vision_after": flops.vision_schedule(None if name == "unmodified" else configs[name],
                                                     num_layers, args.vision)[-1][1],
               "merge_share": shares[name]["share"] if name in shares and lowering == "eager"
               and name not in ("unmodified", "topkv") else None}
        if (lowering, name) in decode_times:
            step = statistics.median(decode_times[(lowering, name)])
            base_step = statistics.median(decode_times[base_of(lowering, decode_times)])
            row.update({"decode_ms_per_step": step * 1e3, "decode_tokens_per_s": 1 / step,
                        "decode_speedup": base_step / step, "decode_steps": len(decode_times[(lowering, name)])})
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], decode: bool) -> str:
    head = "| lowering | variant | vision kept | median ms | speedup | FLOPs ratio | efficiency | merge share |"
    if decode:
        head += " decode ms/step | decode tok/s | decode vs unmodified |"
    table = [head, "|---" * head.count(" | ") + "|---|"]
    for r in rows:
        share = "" if r["merge_share"] is None else f"{r['merge_share'] * 100:.2f}%"
        line = (f"| {r['lowering']} | {r['variant']} | {r['vision_after']} | {r['median_ms']:.0f} | "
                f"{r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | {r['efficiency']:.2f} | {share} |")
        if decode:
            line += (f" {r['decode_ms_per_step']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['decode_speedup']:.2f}x |"
                     if "decode_ms_per_step" in r else "  |  |  |")
        table.append(line)
    return "\n".join(table)


PLOTS = [("median_ms", "prefill latency (ms, median)", "latency_vs_retention.png"),
         ("flops", "prefill FLOPs (G)", "flops_vs_retention.png"),
         ("decode_tokens_per_s", "decode tokens/s (batch 1, median step)", "decode_vs_retention.png")]


def write_results(out: Path, result: dict, log) -> None:
    """results.json, table.md and, with matplotlib, latency / FLOPs / decode tokens/s against
    retention (one line per method)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(result["table"] + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[bench] matplotlib not installed: no plots (pip install matplotlib)")
        return
    vision = result["args"]["vision"]
    for key, ylabel, fname in PLOTS:
        if not any(key in r for r in result["rows"]):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for lowering in sorted({r["lowering"] for r in result["rows"]} - {"transformers"}):
            by_method: dict[str, list] = {}
            for r in result["rows"]:
                if r["lowering"] != lowering or key not in r:
                    continue
                method = r["variant"].split("-")[0]
                y = r[key] / (1e9 if key == "flops" else 1)
                by_method.setdefault(method, []).append((r["vision_after"] / vision * 100, y))
            for method, pts in by_method.items():
                pts.sort()
                style = "o-" if len(pts) > 1 else "s"
                ax.plot(*zip(*pts), style, label=f"{method} ({lowering})" if key != "flops" else method)
            if key == "flops":
                break  # FLOPs do not depend on the lowering
        ax.set_xlabel("vision tokens kept after the last stage (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    log(f"[bench] wrote {out}/(results.json, table.md, *.png)")
