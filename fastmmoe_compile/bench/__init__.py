"""Prefill latency and decode tokens/s of FastMMoE (Top-Kv + routing-aware merging), Top-Kv
alone and FastV, against the unmodified backbone and transformers' own model, in one run
(batch 1). `fastmmoe-compile bench` and benchmarks/bench_prefill.py are thin entries to main().

The model comes from the package's own loader (models.load_model, or Preset.build with a layer
count or a device). The unmodified model runs as `api.compile_model(model, out=None)` builds it,
one engine per lowering; every other variant is rewritten from the same loaded model (same weights)
with `api.rewrite`. All run on the same inputs and are timed in interleaved repetitions (the order
rotates every repetition, so noise from other processes hits every variant alike); we report
medians and ratios. Two lowerings: the ExportedProgram run eagerly (ep.module(), what the `export`
backend runs) and torch.compile (lower.compile_in_process, the in-process `inductor` backend);
speedups are against the unmodified program of the same lowering. FLOPs come from flops.py
(analytic, docs/fastmmoe.md section 4), efficiency = speedup / FLOPs ratio. The merge share is the
part of one eager prefill (torch.profiler) spent in the token-reduction machinery:
fastmmoe::merge_tokens + fastmmoe::last_token_attention + fastmmoe::gather_tokens + the router
chain the pass clones onto the pre-merge stream (wrapped in a profiler range).

Decode: after each variant's prefill, --decode-steps greedy steps through the unmodified engine's
decode path (Engine.start_decode / Engine.decode, what generate runs: the one-token step program,
eager or torch.compile'd like the prefill, over that variant's per-layer caches, shorter after merges);
the transformers row decodes with HF's DynamicCache (passed back each step, cropped back to the
prompt between repetitions). Median ms per step and tokens/s (batch 1).

--device cuda builds the real-size presets (internvl3.5-30b-a3b-backbone, deepseek-vl2-small-
backbone) with random bf16 weights directly on the GPU (no download) and times with
torch.cuda.synchronize around every call.

    fastmmoe-compile bench --threads 1 --layers 4 --vision 512 --reps 2         # CPU, minutes
    fastmmoe-compile bench --threads 1                                          # the issue's CPU setting (~20 min)
    fastmmoe-compile bench --device cuda --preset internvl3.5-30b-a3b-backbone  # GPU (untested here)
"""
from __future__ import annotations

from .options import BenchError, add_arguments, finish_args, parse_args
from .run import main, run
from .timing import decode_rep, engine_decoder, hf_decoder, interleaved, time_prefill, timer
from .variants import build, build_preset, compile_variant, hf_prefill, unmodified_engine, variant_configs

__all__ = ["BenchError", "add_arguments", "build", "build_preset", "compile_variant", "decode_rep", "engine_decoder",
           "finish_args", "hf_decoder", "hf_prefill", "interleaved", "main", "parse_args", "run", "time_prefill",
           "timer", "unmodified_engine", "variant_configs"]
