"""Server throughput and latency vs offline onnxruntime on the same bundle, in one run.

    apt-get install -y wrk          # the load generator (C, one thread); without it: a Python fallback
    python -m benchmarks serving --ray 2 --variant ray   # through Ray Serve, 2 replicas

1. offline: OnnxClassifier.logits on the same sentences, batch 32, length-sorted (the model's own speed);
2. the server (`python -m serve`) at peak: `wrk -t1 -cN` with a Lua script that posts one sentence per
   POST /predict, cycling over all of them; requests/s side by side with offline, and the ratio;
3. p50/p99 latency at 25%, 50% and 100% of that peak (wrk's per-connection delay paces the lower loads;
   the achieved rate is printed beside the target);
4. --profile: where the server's CPU goes at peak: per-thread CPU from /proc (event loop vs. the worker and
   onnxruntime threads, and wrk's own share of the cores), and py-spy's samples of the Python threads by stage.
Sentences: one per line from --texts, else the rt-polarity test split via layerprune.data.

    python -m benchmarks serving-memory            # --memory on the demo's bundle

--memory instead: the server's memory under the worst request of each kind within its limits (the longest
inputs times the most inputs, as texts or as pairs by the bundle; the largest body a valid request can be;
the largest body of one unknown field; a header flood; idle connections over the connection limit), each
on a fresh server: resident memory idle, at its peak (VmHWM) and 2 s after, and what it answered.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from layerprune.errors import LayerpruneError
from layerprune.files import DEFAULT_BUNDLE, SERVE_BENCH_BODIES, SERVE_BENCH_SAMPLES
from layerprune.runtime import OnnxClassifier

from .common import markdown_table
from .harness import ROOT, Results

LUA = """
local bodies = {}
for line in io.lines(os.getenv("LP_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
local pause = tonumber(os.getenv("LP_DELAY_MS") or "0")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "/predict", nil, bodies[i])
end
if pause > 0 then
  delay = function() return pause end
end
"""
# py-spy frames -> stage, first match from the leaf up
STAGES = [
    ("onnxruntime (Python side of session.run)", ("onnxruntime",)),
    ("tokenization", ("tokenize (layerprune/runtime.py", "encode_batch")),
    ("padding", ("pad (layerprune/runtime.py", "_pad (layerprune/runtime.py")),
    ("batching (queue, run planning)", ("serve/batcher.py",)),
    ("JSON", ("json/", "render (starlette", "render (fastapi")),
    ("validation (pydantic)", ("pydantic", "_compat", "request_body_to_args", "solve_dependencies")),
    ("routes", ("serve/app.py", "serve/schemas.py")),
    ("guard middleware + metrics", ("serve/guard.py", "prometheus_client")),
    ("HTTP (uvicorn, httptools, starlette, fastapi)", ("uvicorn/", "httptools", "h11", "starlette/", "fastapi/")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop", "concurrent/futures", "threading.py")),
]


def sentences(path: Path | None, limit: int) -> list[str]:
    if path is not None:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from layerprune.data import load_examples
        from layerprune.tasks import load_task

        texts = load_examples(load_task("rt-polarity"), "test").texts
    if not texts:
        raise LayerpruneError(f"no sentences in {path}")
    return texts[:limit]


def offline_throughput(bundle: Path, texts: list[str], batch_size: int, threads: int | None, seconds: float) -> float:
    """Sentences/s of OnnxClassifier.logits (length-sorted batches) over all texts, repeated for `seconds`."""
    clf = OnnxClassifier(bundle, threads=threads)
    clf.logits(texts[:batch_size], batch_size=batch_size)  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        clf.logits(texts, batch_size=batch_size)
        done += len(texts)
        if time.perf_counter() - start >= seconds:
            return done / (time.perf_counter() - start)


# --- load generators --------------------------------------------------------------------------------------


def run_wrk(url: str, bodies: Path, connections: int, duration: float, delay_ms: float = 0.0) -> dict:
    """wrk -t1 -cN --latency with the cycling Lua script -> {rps, p50, p99 (ms), errors}."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA)
    env = {**os.environ, "LP_BODIES": str(bodies), "LP_DELAY_MS": f"{delay_ms:.3f}"}
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "30s", "--latency", "-s",
           f.name, url]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=duration + 60)
    os.unlink(f.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode != 0 or rps is None:
        raise LayerpruneError(f"wrk failed: {out.strip()}")
    lat = {p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:.*?(\d+).*?(\d+).*?(\d+).*?(\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"rps": float(rps.group(1)), "p50": lat.get("50", float("nan")), "p99": lat.get("99", float("nan")),
            "errors": errors}


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_python(url: str, texts: list[str], connections: int, duration: float, delay_ms: float = 0.0) -> dict:
    """Fallback without wrk: N threads with keep-alive httpx clients (caps what a 2-core host can show)."""
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
                (mine.append(time.perf_counter() - t0) if r.status_code == 200 else None)
                bad += r.status_code != 200
                i += connections
                if delay_ms:
                    time.sleep(delay_ms / 1000)
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(client, range(connections)))
    lat = np.array(latencies) * 1000
    return {"rps": len(latencies) / (time.perf_counter() - start), "errors": errors[0],
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan")}


def at_rate(load, target: float, connections: int, duration: float) -> tuple[dict, float]:
    """A run paced to about `target` requests/s: per-connection delay d from rate = c / (d + latency),
    calibrated by one short run. Returns (result, delay ms)."""
    delay = 1000.0 * connections / target
    probe = load(delay_ms=delay, duration=min(4.0, duration))
    latency = max(0.0, 1000.0 * connections / max(probe["rps"], 1e-9) - delay)
    delay = max(0.0, 1000.0 * connections / target - latency)
    return load(delay_ms=delay, duration=duration), delay


# --- the server and its profile -------------------------------------------------------------------------------


def start_server(bundle: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "serve", str(bundle), "--port", str(port), "--max-batch-size", str(args.batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(4096, 4 * args.connections)),
           "--log-level", "warning"]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--allow-unvalidated"] if args.allow_unvalidated else []
    cmd += ["--ray", "--replicas", str(args.ray)] if args.ray else []
    server = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + (300 if args.ray else 120)
    while True:
        if server.poll() is not None:
            raise LayerpruneError(f"the server exited {server.returncode}: {server.stderr.read().strip()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise LayerpruneError("the server never became ready")
        time.sleep(0.2)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per thread of `pid`, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def profile_stages(raw: Path) -> Counter:
    """py-spy's raw (collapsed) stacks -> samples per stage."""
    stages: Counter = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")[::-1]
        stage = next((name for frame in frames for name, keys in STAGES if any(k in frame for k in keys)), "other")
        stages[stage] += int(count)
    return stages


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory line of /proc/PID/status in MB (VmRSS now, VmHWM the peak so far); nan where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.split()[-1])
    return total


# --- memory: the worst request of each kind -------------------------------------------------------------------


def _post_at_once(url: str, body: bytes, times: int) -> str:
    """`times` POST /predict of `body` at once -> their statuses, counted."""
    def post(_: int) -> int:
        return httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"},
                          timeout=600).status_code

    with ThreadPoolExecutor(times) as pool:
        return _counted(pool.map(post, range(times)))


def _counted(statuses) -> str:
    return ", ".join(f"{n} x {status}" for status, n in sorted(Counter(statuses).items()))


def _header_flood(url: str, connections: int, most: int) -> str:
    """`connections` clients at once, each sending a header that never ends (up to `most` bytes)."""
    import socket

    host, port = url.rsplit("//", 1)[1].split(":")

    def flood(_: int) -> str:
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            sent, piece = 0, b"a" * 65536
            try:
                while sent < most:
                    sock.sendall(piece)
                    sent += len(piece)
                reply = sock.recv(64)
            except OSError:  # closed while sending: the answer went before the close
                try:
                    reply = sock.recv(64)
                except OSError:
                    reply = b""
        return reply.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"

    with ThreadPoolExecutor(connections) as pool:
        return _counted(pool.map(flood, range(connections)))


def _idle_connections(url: str, count: int) -> str:
    """`count` connections that send nothing, held while /health and /predict are asked."""
    import socket

    host, port = url.rsplit("//", 1)[1].split(":")
    held = [socket.create_connection((host, int(port)), timeout=60) for _ in range(count)]
    try:
        health = httpx.get(f"{url}/health", timeout=60).status_code
        predict = httpx.post(f"{url}/predict", json={"inputs": "a"}, timeout=60)
        return f"GET /health {health}; POST /predict {predict.status_code} {predict.json().get('error_type', '')}"
    finally:
        for sock in held:
            sock.close()


def memory_table(args: argparse.Namespace, out: Results) -> int:
    """One fresh server per attack; its resident memory idle, at its peak and after, and its answers."""
    bundle = args.bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    pair = manifest["pair_input"]
    from layerprune.serve.settings import ServeSettings

    settings = ServeSettings()
    n, chars = settings.max_inputs_per_request, settings.max_chars_per_input
    words = ("w " * chars)[:chars]  # a token every two characters
    one = [[words, words]] * n if pair else [words] * n
    widest = ["\U0001f600" * chars] * (2 if pair else 1)  # 12 bytes a character, escaped
    valid = json.dumps({"inputs": [widest] * n if pair else widest * n}).encode()
    limit = settings.max_body_bytes(pair)
    pad = limit - 1024
    unknown = json.dumps({"inputs": [["a", "b"]] if pair else "a", "extra": "x" * pad}).encode()
    lists = b'{"inputs": "a", "extra": [' + b"[], " * (pad // 4) + b"[]]}"
    kind = "pairs" if pair else "texts"
    longest = json.dumps({"inputs": one}).encode()
    attacks = [
        (f"{n} {kind} of {chars:,} characters (~{chars // 2:,} tokens each), 1 request ({len(longest) / 1e6:.1f} MB)",
         lambda url: _post_at_once(url, longest, 1)),
        ("the same, 8 requests at once", lambda url: _post_at_once(url, longest, 8)),
        (f"the largest valid body: {n} {kind} of {chars:,} emoji, escaped ({len(valid) / 1e6:.1f} MB), 8 at once",
         lambda url: _post_at_once(url, valid, 8)),
        (f"one unknown field, a string as long as the body limit allows ({len(unknown) / 1e6:.1f} MB), 8 at once",
         lambda url: _post_at_once(url, unknown, 8)),
        (f"one unknown field, {pad // 4:,} empty lists ({len(lists) / 1e6:.1f} MB), 8 at once",
         lambda url: _post_at_once(url, lists, 8)),
        ("50 connections sending 20 MB of headers that never end", lambda url: _header_flood(url, 50, 20 << 20)),
        (f"{settings.max_connections + 6:,} idle connections (max_connections {settings.max_connections:,})",
         lambda url: _idle_connections(url, settings.max_connections + 6)),
    ]
    rows = []
    for name, attack in attacks:
        server, url = start_server(bundle, args)
        try:
            idle = rss_mb(server.pid)
            answers = attack(url)
            time.sleep(2)  # the server gives freed memory back after a second without requests
            peak, after = rss_mb(server.pid, "VmHWM"), rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        rows.append([name, answers, f"{idle:.0f}", f"{peak:.0f}", f"{after:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    head = (f"bundle {bundle} ({manifest.get('quantize') or 'fp32'}, {manifest['depth']} of "
            f"{manifest['total_layers']} layers, max length {manifest['max_length']}, {kind}); limits: {n} inputs, "
            f"{chars:,} characters, body {limit:,} bytes, head {settings.max_header_bytes:,} bytes.")
    table = markdown_table(["attack", "answers", "RSS idle MB", "peak MB", "2 s later MB"], rows, "llrrr")
    out.write(f"serving memory: the worst request of each kind, {bundle}", f"{head}\n\n{table}")
    return 0


# --- main ------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--texts", type=Path, help="sentences, one a line (default: rt-polarity test split)")
    p.add_argument("--limit", type=int, default=100_000, help="use the first N sentences")
    p.add_argument("--connections", "--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load level")
    p.add_argument("--batch-size", type=int, default=32, help="server max batch size = offline batch size")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads, both sides")
    p.add_argument("--loads", default="0.25,0.5", help="fractions of peak for the latency table")
    p.add_argument("--client", choices=["wrk", "python"], help="load generator (default: wrk when installed)")
    p.add_argument("--profile", action="store_true", help="per-thread CPU and py-spy stages at peak")
    p.add_argument("--allow-unvalidated", action="store_true")
    p.add_argument("--ray", type=int, metavar="REPLICAS", help="serve with Ray Serve and this many replicas "
                   "(--profile then sees only the driver)")
    p.add_argument("--memory", action="store_true", help="instead: the server's memory under the worst request "
                   "of each kind within its limits")


def run(args: argparse.Namespace, out: Results) -> int:
    client = args.client or ("wrk" if shutil.which("wrk") else "python")
    if client == "wrk" and not shutil.which("wrk"):
        raise LayerpruneError("wrk is not installed: apt-get install -y wrk (Debian/Ubuntu), brew install wrk (macOS)")
    if args.memory:
        return memory_table(args, out)
    texts = sentences(args.texts, args.limit)
    offline = offline_throughput(args.bundle, texts, args.batch_size, args.threads, min(args.duration, 10.0))
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        workdir = Path(scratch)
        bodies = workdir / SERVE_BENCH_BODIES
        bodies.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in texts), encoding="utf-8")
        server, url = start_server(args.bundle, args)
        try:
            def load(delay_ms: float = 0.0, duration: float = args.duration) -> dict:
                if client == "wrk":
                    return run_wrk(url, bodies, args.connections, duration, delay_ms)
                return run_python(url, texts, args.connections, duration, delay_ms)

            load(duration=min(3.0, args.duration))  # warm the connections and the allocator
            before = thread_cpu(server.pid)
            spy = _start_py_spy(server.pid, args.duration, workdir) if args.profile else None
            wall = time.perf_counter()
            peak = load()
            wall = time.perf_counter() - wall
            after = thread_cpu(server.pid)
            if spy is not None:
                spy.wait(timeout=60)
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            rows = [(1.0, peak, 0.0)]
            for fraction in (float(x) for x in args.loads.split(",") if x.strip()):
                result, delay = at_rate(load, fraction * peak["rps"], args.connections, args.duration)
                rows.append((fraction, result, delay))
            peak_mb = rss_mb(server.pid, "VmHWM")
            info = httpx.get(f"{url}/info", timeout=10).json()
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        profile = _profile(server.pid, before, after, wall, peak, workdir) if args.profile else []

    real = _metric(metrics, 'layerprune_tokens_total{kind="real"}')
    padding = _metric(metrics, 'layerprune_tokens_total{kind="padding"}')
    batches, inputs = _metric(metrics, "layerprune_batch_size_count"), _metric(metrics, "layerprune_batch_size_sum")
    body = [
        f"{len(texts)} sentences, {args.connections} connections x {args.duration:.0f} s per level, load generator "
        f"{client}, max batch {args.batch_size}, max wait {args.max_wait_ms} ms, threads {args.threads or 'default'}, "
        f"run overhead {info.get('run_overhead_tokens')} tokens.", "",
        markdown_table(["path", "sentences/s", "share of offline"], [
            [f"offline OnnxClassifier.logits (batch {args.batch_size}, length-sorted)", f"{offline:.1f}", "100%"],
            [f"server POST /predict, 1 sentence/request, {args.connections} connections", f"{peak['rps']:.1f}",
             f"**{peak['rps'] / offline:.0%}**"]], "lrr"), "",
        f"Mean run {inputs / max(batches, 1):.1f} rows; padding {padding / max(real + padding, 1):.0%} of the tokens "
        f"run; server peak RSS (VmHWM) {peak_mb:.0f} MB.", "",
        markdown_table(["load", "target req/s", "achieved req/s", "p50 ms", "p99 ms", "errors"], [
            [f"{fraction:.0%} of peak", f"{fraction * peak['rps']:.0f}", f"{r['rps']:.1f}", f"{r['p50']:.1f}",
             f"{r['p99']:.1f}", r["errors"]] for fraction, r, _ in sorted(rows, key=lambda x: x[0])], "lrrrrr"),
        *profile,
    ]
    out.write(f"serving: {args.bundle} ({info.get('model_dtype')}, {info.get('depth')} of {info.get('total_layers')} "
              f"layers, {info.get('providers', ['?'])[0]}) against offline onnxruntime", "\n".join(body))
    return 0 if all(r["errors"] == 0 for _, r, _ in rows) else 1


def _start_py_spy(pid: int, duration: float, workdir: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not spy:
        print("py-spy is not installed (pip install py-spy): no stage profile", file=sys.stderr)
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, round(duration))),
                             "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(workdir / SERVE_BENCH_SAMPLES)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _profile(pid: int, before: dict[int, float], after: dict[int, float], wall: float, peak: dict,
             workdir: Path) -> list[str]:
    """Where the server's CPU went at peak: per thread from /proc, and py-spy's samples by stage."""
    requests = peak["rps"] * wall
    loop = after.get(pid, 0.0) - before.get(pid, 0.0)
    others = sum(after.values()) - sum(before.values()) - loop
    cores = os.cpu_count() or 1
    lines = ["", f"CPU per request at peak ({cores} cores, {wall:.0f} s): event loop thread (HTTP, JSON, validation, "
                 f"routes) {1e6 * loop / requests:.0f} us; worker + onnxruntime threads (tokenization, padding, "
                 f"inference) {1e6 * others / requests:.0f} us; server total "
                 f"{100 * (loop + others) / (wall * cores):.0f}% of the cores (the rest: wrk and other processes)."]
    raw = workdir / SERVE_BENCH_SAMPLES
    if raw.is_file():
        stages = profile_stages(raw)
        total = sum(stages.values()) or 1
        lines += ["", markdown_table(["stage (py-spy samples of the server's Python threads; onnxruntime's own pool "
                                      "threads are not Python)", "share"],
                                     [[name, f"{n / total:.0%}"] for name, n in stages.most_common()], "lr")]
    return lines
