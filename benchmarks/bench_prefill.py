"""Prefill latency and decode tokens/s of FastMMoE, Top-Kv and FastV against the unmodified
backbone and transformers' model: a script entry to fastmmoe_compile.bench (the same as
`fastmmoe-compile bench`; see that module for what is measured and how).

    python benchmarks/bench_prefill.py --threads 1 --layers 4 --vision 512 --reps 2   # minutes
    python benchmarks/bench_prefill.py --threads 1                                    # the issue's CPU setting
    python benchmarks/bench_prefill.py --variants unmodified,fastmmoe --keep-ratios 0.5 --no-compile --no-decode
"""
import sys

from fastmmoe_compile.bench import BenchError, main

if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"bench_prefill.py: error: {e}")
