"""Server throughput and latency vs offline onnxruntime on the same bundle.

    python benchmarks/serve_bench.py lp-run/bundle [--texts FILE] [--clients 32] [--duration 20]
                                      [--batch-size 32] [--allow-unvalidated]

Starts `python -m serve` on loopback, runs N concurrent clients (each: one sentence per POST /predict,
back to back) for a bounded time, then prints a markdown table of requests/s and p50/p95/p99 latency
beside the bundle's offline throughput (OnnxClassifier.logits at the same batch size, same sentences).
Sentences: one per line from --texts, else the rt-polarity test split via layerprune.data.
"""

from __future__ import annotations

import argparse
import threading
from concurrent.futures import ThreadPoolExecutor
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerprune.runtime import OnnxClassifier  # noqa: E402


def sentences(path: Path | None, limit: int) -> list[str]:
    if path is not None:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from layerprune.data import load_examples
        from layerprune.tasks import load_task

        texts = load_examples(load_task("rt-polarity"), "test").texts
    if not texts:
        raise SystemExit("no sentences")
    return texts[:limit]


def offline_throughput(bundle: Path, texts: list[str], batch_size: int, threads: int | None, seconds: float) -> float:
    clf = OnnxClassifier(bundle, threads=threads)
    clf.logits(texts[:batch_size], batch_size=batch_size)  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        clf.logits(texts, batch_size=batch_size)
        done += len(texts)
        if time.perf_counter() - start >= seconds:
            return done / (time.perf_counter() - start)


def load(url: str, texts: list[str], clients: int, duration: float) -> tuple[list[float], int, float]:
    """`clients` threads, each with its own keep-alive connection, posting back to back until `duration`.
    (Threads with sync httpx clients: httpx's AsyncClient was itself the bottleneck, ~50 req/s.)"""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = time.perf_counter()
    stop = start + duration

    def client(k: int) -> None:
        mine, bad, i = [], 0, k
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = http.post("/predict", json={"inputs": texts[i % len(texts)]})
                if r.status_code == 200:
                    mine.append(time.perf_counter() - t0)
                else:
                    bad += 1
                i += clients
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return latencies, errors[0], time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path, nargs="?", default=Path("lp-run/bundle"))
    p.add_argument("--texts", type=Path, help="sentences, one a line (default: rt-polarity test split)")
    p.add_argument("--limit", type=int, default=1000, help="use the first N sentences")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (bounded)")
    p.add_argument("--batch-size", type=int, default=32, help="server max batch size = offline batch size")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads, both sides")
    p.add_argument("--allow-unvalidated", action="store_true")
    args = p.parse_args(argv)

    texts = sentences(args.texts, args.limit)
    offline = offline_throughput(args.bundle, texts, args.batch_size, args.threads, min(args.duration, 10.0))

    port = free_port()
    cmd = [sys.executable, "-m", "serve", str(args.bundle), "--port", str(port), "--max-batch-size",
           str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(4096, 4 * args.clients)),
           "--log-level", "warning"]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--allow-unvalidated"] if args.allow_unvalidated else []
    server = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print(f"server exited {server.returncode}: {server.stderr.read().strip()}", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("server never became ready", file=sys.stderr)
                return 1
            time.sleep(0.2)
        load(url, texts, args.clients, min(2.0, args.duration))  # warm the connections
        latencies, errors, elapsed = load(url, texts, args.clients, args.duration)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        peak_mb = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    lat = np.array(latencies) * 1000
    rps = len(latencies) / elapsed
    batches = _metric(metrics, "layerprune_batch_size_count")
    inputs = _metric(metrics, "layerprune_batch_size_sum")
    print(f"\nbundle {args.bundle}, {len(texts)} sentences, {args.clients} clients x {args.duration:.0f} s, "
          f"batch size {args.batch_size}, max wait {args.max_wait_ms} ms, threads {args.threads or 'default'}\n")
    print("| path | requests (inputs)/s | p50 ms | p95 ms | p99 ms | errors | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| offline OnnxClassifier.logits (batch {args.batch_size}) | {offline:.1f} | | | | | {args.batch_size} |")
    p50, p95, p99 = (np.percentile(lat, q) if len(lat) else float("nan") for q in (50, 95, 99))
    mean_batch = inputs / batches if batches else float("nan")
    print(f"| server POST /predict, 1 sentence/request | {rps:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {errors} | "
          f"{mean_batch:.1f} |")
    print(f"\nserver / offline: **{rps / offline:.0%}** (target >= 85% at 32 clients)")
    print(f"server peak RSS (VmHWM): {peak_mb:.0f} MB")
    return 0 if errors == 0 else 1


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (Linux VmHWM), in MB; nan where /proc has no such line."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
