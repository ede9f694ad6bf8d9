"""Serving under load: an unmodified engine vs a FastMMoE engine of the same VLM, each behind
`fastmmoe-compile serve` (same flags), driven by N concurrent `openai` clients for a fixed time.

Both servers run for the whole benchmark; the load alternates between them (round r hits the
unmodified one first when r is even, the FastMMoE one first when odd), so noise from other
processes falls on both alike. Each client loops: a streaming chat request (one image as a
data URL, a short question, greedy, max_tokens new tokens), timing the first token (TTFT: request
sent -> first chunk, which the server sends with the first token) and counting output tokens from
the usage chunk. Reported per variant and concurrency: requests/s, output tokens/s, TTFT p50/p99.

    python benchmarks/bench_serve.py                                     # tiny-internvl, concurrency 1 and 8
    python benchmarks/bench_serve.py --concurrency 1,4,16 --seconds 30 --rounds 3
    python benchmarks/bench_serve.py --engines DIR_UNMODIFIED DIR_FASTMMOE  # engines you compiled
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FASTMMOE_FLAGS = ["--vision-expert-ratio", "0.5", "--merge-layers", "2", "--keep-ratio", "0.5"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-internvl", help="a VLM preset or checkpoint to compile (export backend)")
    p.add_argument("--engines", nargs=2, metavar=("UNMODIFIED", "FASTMMOE"), default=None,
                   help="serve these engine dirs instead of compiling --model")
    p.add_argument("--fastmmoe-flags", default=" ".join(FASTMMOE_FLAGS),
                   help=f"compile flags of the FastMMoE engine (default: {' '.join(FASTMMOE_FLAGS)})")
    p.add_argument("--concurrency", default="1,8", help="client counts, comma-separated (default 1,8)")
    p.add_argument("--seconds", type=float, default=20, help="load time per variant, concurrency and round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (default 16)")
    p.add_argument("--image-size", default="224x224", help="HxW of the request image (default 224x224)")
    p.add_argument("--max-batch", type=int, default=16, help="the servers' --max-batch (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (OMP_NUM_THREADS, default 1)")
    p.add_argument("--out", default="benchmarks/results/serve_cpu.json")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine, name, args, log):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "fastmmoe_compile.cli", "serve", str(engine), "--port", str(port),
                             "--served-model-name", name, "--max-batch", str(args.max_batch), "--max-queue", "1024",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {name} server exited with {proc.returncode} (log: {log.name})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the {name} server did not start (log: {log.name})")


def image_url(size: str) -> str:
    import numpy as np
    from PIL import Image

    h, w = (int(x) for x in size.split("x"))
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8")).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def load(url: str, name: str, clients: int, seconds: float, args, image: str) -> dict:
    """`clients` threads sending requests back to back for `seconds`; what completed in that time."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "Describe the image."}]}]
    records, errors, lock = [], [], threading.Lock()
    start = time.monotonic()
    stop_at = start + seconds

    def worker():
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            try:
                stream = client.chat.completions.create(model=name, messages=messages, max_tokens=args.max_tokens,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True})
                first, tokens = None, 0
                for chunk in stream:
                    first = first or time.monotonic()
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                done = time.monotonic()
            except Exception as e:  # noqa: BLE001  (counted and reported, never hidden)
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                records.append((sent, first - sent, done, tokens))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start  # requests started before stop_at run to the end
    return {"elapsed_s": elapsed, "requests": len(records), "tokens": sum(r[3] for r in records),
            "ttft_s": [r[1] for r in records], "errors": errors}


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main(argv=None) -> dict:
    args = parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if args.engines:
        engines = {"unmodified": Path(args.engines[0]), "fastmmoe": Path(args.engines[1])}
    else:
        from fastmmoe_compile.cli import main as cli

        engines = {"unmodified": work / "unmodified", "fastmmoe": work / "fastmmoe"}
        for variant, flags in (("unmodified", ["--vision-expert-ratio", "1.0"]),
                               ("fastmmoe", args.fastmmoe_flags.split())):
            log(f"compiling {args.model} ({variant}) ...")
            assert cli([args.model, "--out", str(engines[variant]), "--backend", "export", "--quiet", *flags]) == 0
    servers, logs = {}, {}
    try:
        for variant, engine in engines.items():
            logs[variant] = open(work / f"{variant}.log", "w")
            servers[variant] = start_server(engine, variant, args, logs[variant])
        image = image_url(args.image_size)
        runs = {(v, c): [] for v in engines for c in levels}
        for round_ in range(args.rounds):
            for clients in levels:
                order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
                for variant in order:
                    result = load(servers[variant][1], variant, clients, args.seconds, args, image)
                    runs[(variant, clients)].append(result)
                    log(f"round {round_} clients {clients} {variant}: {result['requests']} requests, "
                        f"{result['tokens']} tokens in {result['elapsed_s']:.1f} s, {len(result['errors'])} errors")
        with urllib.request.urlopen(servers["fastmmoe"][1] + "/metrics", timeout=10) as r:
            vision = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in r.read().decode().splitlines()
                      if line.startswith("fastmmoe_vision_tokens_total")}
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
        for f in logs.values():
            f.close()
    rows = []
    for (variant, clients), results in runs.items():
        elapsed = sum(r["elapsed_s"] for r in results)
        ttft = [t for r in results for t in r["ttft_s"]]
        rows.append({"variant": variant, "clients": clients, "requests": sum(r["requests"] for r in results),
                     "errors": sum(len(r["errors"]) for r in results),
                     "requests_per_s": sum(r["requests"] for r in results) / elapsed,
                     "output_tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
                     "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99)})
    print("| clients | variant | requests | errors | requests/s | output tokens/s | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["clients"], r["variant"] != "unmodified")):
        print(f"| {r['clients']} | {r['variant']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
              f"{r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")
    print(f"FastMMoE server's vision tokens before/after reduction: {vision}")
    summary = {"args": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                               "python": platform.python_version()},
               "rows": rows, "fastmmoe_vision_tokens": vision,
               "errors": {f"{v}@{c}": [e for r in rs for e in r["errors"]][:5] for (v, c), rs in runs.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    log(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
