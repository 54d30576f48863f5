"""The server under hostile or careless clients. Bounded JSON-safe errors (never a 500, never the
payload echoed), JSON-only bodies, an optional API key, bounded metric labels, offline docs, header/body/
idle timeouts and a bounded shutdown drain on a real uvicorn process, work of gone clients never run, a
per-run token budget and a token-bounded queue with Retry-After; a hypothesis fuzz of 1,000+ requests."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerprune.serve.app import create_app
from layerprune.serve.batcher import MicroBatcher, Overloaded, estimate_tokens, plan_runs
from layerprune.serve.metrics import Metrics
from layerprune.serve.model import load_model
from layerprune.serve.settings import ServeSettings
from conftest import ServerProcess, serving, wait_ready

MAX_ERROR_BYTES = 4096  # any error answer: the field and the problem, never the payload
# The bundle, `client` and the reference are conftest's; `timeout_server` below is this module's own server.


def _post(client, route: str, raw: bytes, content_type: str | None = "application/json"):
    return client.post(route, content=raw, headers={"content-type": content_type} if content_type else {})


# --- 1, 2: never a 500, never the payload ----------------------------------------------------------------

HOSTILE = [
    ("/predict", b'{"inputs": NaN}'),
    ("/predict", b'{"inputs": Infinity}'),
    ("/predict", b'{"inputs": -Infinity}'),
    ("/predict", b'{"inputs": 1e999}'),
    ("/predict", b'{"inputs": "a", "truncate": Infinity}'),
    ("/v1/classify", b'{"texts": ["a"], "truncate": NaN}'),
    ("/v1/classify", b'{"texts": [NaN]}'),
    ("/predict", b'{"texts": ["\\ud800"]}'),
    ("/predict", b'{"inputs": ["\\ud800"]}'),
    ("/predict", b'{"inputs": "ok \\udfff"}'),
    ("/predict", b'{"inputs": [["a", "\\ud800"]]}'),
    ("/v1/classify", b'{"inputs": ["\\ud800"], "truncate": "x"}'),
    ("/v1/classify", b'{"texts": ["\\ud800"]}'),
    ("/v1/classify", b'{"\\ud800": 1, "texts": ["a"]}'),
    ("/predict", b"[" * 100_000),
    ("/predict", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
]


@pytest.mark.parametrize("route, raw", HOSTILE, ids=lambda x: x if isinstance(x, str) else x[:40].decode(errors="replace"))
def test_hostile_json_gets_a_bounded_4xx(client, route, raw) -> None:
    r = _post(client, route, raw)
    assert 400 <= r.status_code < 500, r.text[:500]
    assert len(r.content) <= MAX_ERROR_BYTES
    body = r.json()
    assert body["error"] and body["error_type"]


def test_surrogates_are_named_as_such(client) -> None:
    r = _post(client, "/v1/classify", b'{"texts": ["fine", "bad \\ud800"]}')
    assert r.status_code == 422 and "texts[1] is not valid Unicode" in r.json()["error"]


def test_huge_field_is_not_echoed(client) -> None:
    """A 5 MB extra field is not echoed back in the 422 (it would make a 5,000,184-byte answer)."""
    huge = "x" * 5_000_000
    for route, body in [("/v1/classify", {"texts": ["a"], "extra": huge}), ("/v1/classify", {"texts": ["a"], huge: 1}),
                        ("/predict", {"inputs": {"nested": huge}}), ("/predict", {"inputs": "a", "truncate": huge})]:
        r = client.post(route, json=body)
        assert r.status_code == 422, r.text[:300]
        assert len(r.content) <= MAX_ERROR_BYTES, len(r.content)


REFUSED_422 = [
    ("not UTF-8", b'{"inputs": "caf\xe9"}', {}, "not UTF-8"),
    ("nested 100,000 deep", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, "JSON values"),
    ("a list of 1.9 million empty lists", b'{"inputs": "a", "extra": [' + b"[], " * 1_900_000 + b"[]]}", {},
     "JSON values"),
    ("gzip", __import__("gzip").compress(b'{"inputs": "a fine movie"}'), {"content-encoding": "gzip"}, "gzip"),
    ("top_k a string", b'{"inputs": "a", "parameters": {"top_k": "1"}}', {}, "top_k"),
    ("top_k true", b'{"inputs": "a", "parameters": {"top_k": true}}', {}, "top_k"),
    ("top_k 2**70", b'{"inputs": "a", "parameters": {"top_k": 1180591620717411303424}}', {}, "top_k"),
]


@pytest.mark.parametrize("raw, headers, words", [case[1:] for case in REFUSED_422], ids=[c[0] for c in REFUSED_422])
def test_refused_before_parsing_or_by_the_schema_as_422(client, raw, headers, words) -> None:
    """TEI's 422 Validation with its body, naming the problem: bodies that are not UTF-8, nest deep, would
    parse into millions of objects (no parser runs on them) or are compressed, and a top_k that is not an
    integer an int32 holds."""
    r = client.post("/predict", content=raw, headers={"content-type": "application/json", **headers})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation", r.text[:300]
    assert words in r.json()["error"], r.json()["error"]


def test_top_k_takes_integers(client, reference) -> None:
    r = client.post("/predict", json={"inputs": "a fine movie", "parameters": {"top_k": 1}})
    assert r.status_code == 200 and [[d["label"] for d in r.json()[0]]] == [[reference.ranked("a fine movie")[0][0]]]
    r = client.post("/predict", json={"inputs": "a fine movie", "parameters": {"top_k": 2**31 - 1}})
    assert r.status_code == 200 and len(r.json()[0]) == len(reference.labels)


def test_unknown_fields(client) -> None:
    """/predict ignores fields it does not know, as TEI does (its request types do not deny them): a client
    may send the Inference API's "options"; /v1/classify, layerprune's own, refuses them."""
    assert client.post("/predict", json={"inputs": "a", "options": {"wait_for_model": True}}).status_code == 200
    r = client.post("/v1/classify", json={"texts": ["a"], "options": {}})
    assert r.status_code == 422 and "options" in r.json()["error"]


def test_head_health_answers_as_get(client) -> None:
    for path in ["/health", "/", "/healthz", "/readyz"]:
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers.get("content-length") == get.headers.get("content-length")


# --- 7: metric labels stay bounded ------------------------------------------------------------------------


def test_random_methods_and_paths_add_no_series(client) -> None:
    """5,000 random methods do not make 5,001 series: the first few make the 'other' ones, and the rest add
    none."""
    def series(text: str) -> list[str]:
        return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("layerprune_")]

    client.get("/metrics")  # its own series exists from here on
    sizes = []
    for start, stop in [(0, 20), (20, 320)]:
        for i in range(start, stop):
            client.request(f"M{i}X", f"/p{i}")
            client.request(f"Z{i}", "/predict")
        sizes.append(client.get("/metrics").text)
    assert series(sizes[0]) == series(sizes[1])
    assert not any(f"M{i}X" in sizes[1] or f"/p{i}" in sizes[1] for i in (0, 150, 319))
    assert len(sizes[1]) < len(sizes[0]) + 200  # counters' digits only


def test_every_route_has_its_own_label(client) -> None:
    """A route is declared once, on its router in app.py: the request metrics label by name each path the app
    answers on (TEI's, layerprune's, the probes, the API description, and whatever /openapi.json lists), and any
    other path as 'other'."""
    paths = {"/", "/predict", "/info", "/health", "/v1/classify", "/v1/models", "/healthz", "/readyz", "/metrics",
             "/docs", "/openapi.json", "/redoc"} | set(client.get("/openapi.json").json()["paths"])
    for path in [*sorted(paths), "/nowhere"]:
        client.request("OPTIONS", path)
    labels = {line.split('route="')[1].split('"')[0] for line in client.get("/metrics").text.splitlines()
              if line.startswith("layerprune_requests_total{")}
    assert labels == paths | {"other"}, labels ^ (paths | {"other"})


# --- 8: content type, CORS ----------------------------------------------------------------------------------


def test_cors_off_unless_configured(bundle, client) -> None:
    preflight = {"origin": "http://evil.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type"}
    r = client.options("/predict", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = client.post("/predict", json={"inputs": "a"}, headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    with serving(bundle, cors_origins=["http://app.example"]) as c:
        r = c.options("/predict", headers={**preflight, "origin": "http://app.example"})
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == "http://app.example"
        r = c.options("/predict", headers=preflight)  # no allow-origin at all ("*" would let evil.example in)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, dict(r.headers)
        r = c.post("/predict", json={"inputs": "a"}, headers={"origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# --- 9: API key; no paths in what clients see ------------------------------------------------------------------


def test_api_key(bundle) -> None:
    with serving(bundle, api_key="s3cret") as c:
        for route, body in [("/predict", {"inputs": "a"}), ("/v1/classify", {"texts": ["a"]})]:
            for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                            {"authorization": "Basic s3cret"}]:
                r = c.post(route, json=body, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
                assert r.json()["error_type"] == "Unauthorized"
            assert c.post(route, json=body, headers={"authorization": "Bearer s3cret"}).status_code == 200
        for path in ["/v1/models", "/metrics"]:
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"authorization": "Bearer s3cret"}).status_code == 200
        for path in ["/healthz", "/readyz", "/docs", "/openapi.json"]:  # probes and the API description
            assert c.get(path).status_code == 200, path
        schemes = c.get("/openapi.json").json()["components"]["securitySchemes"]
        assert any(s.get("scheme") == "bearer" for s in schemes.values())


def test_a_non_ascii_key_is_compared_as_utf8(bundle) -> None:
    key = "ключ-κλειδί-鍵"
    with serving(bundle, api_key=key) as c:
        ok = c.post("/predict", json={"inputs": "a"}, headers={"authorization": b"Bearer " + key.encode("utf-8")})
        assert ok.status_code == 200, ok.text
        for sent in [key.encode("utf-8").decode("latin-1").encode("utf-8"), key.encode("utf-16-le")]:
            r = c.post("/predict", json={"inputs": "a"}, headers={"authorization": b"Bearer " + sent})
            assert r.status_code == 401, sent


@pytest.mark.parametrize("where", ["flag", "environment"])
@pytest.mark.parametrize("key", ["", "  ", "\t", " padded "])
def test_an_empty_or_padded_key_is_refused_at_start(bundle, monkeypatch, capsys, where, key) -> None:
    """An empty key would turn authentication off without a word; one with whitespace around it can never be
    sent in a header. Either: one line, exit 2, before anything is served."""
    import uvicorn

    from layerprune.serve.main import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *args, **kwargs: pytest.fail("it started serving"))
    argv = [str(bundle), "--port", "0"]
    if where == "flag":
        argv += ["--api-key", key]
    else:
        monkeypatch.setenv("LAYERPRUNE_SERVE_API_KEY", key)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("layerprune serve: error: bad serve setting api_key:") and err.count("\n") == 1, err


def test_cors_origins_not_json_is_one_line(bundle, monkeypatch, capsys) -> None:
    import uvicorn

    from layerprune.serve.main import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *args, **kwargs: pytest.fail("it started serving"))

    monkeypatch.setenv("LAYERPRUNE_SERVE_CORS_ORIGINS", "not json")
    assert main([str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layerprune serve: error: ") and "cors_origins" in err and err.count("\n") == 1, err


def test_a_port_in_use_is_one_line(bundle, capsys) -> None:
    """Told before the model loads, as a bad setting is: one line, exit 2."""
    from layerprune.serve.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([str(bundle), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"layerprune serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_no_local_paths_exposed(client, bundle) -> None:
    source = json.loads((bundle / "manifest.json").read_text())["source_checkpoint"]
    assert Path(source).is_absolute()
    for path in ["/v1/models", "/openapi.json", "/docs"]:
        text = client.get(path).text
        assert source not in text and str(bundle) not in text, path
    assert client.get("/v1/models").json()["data"][0]["source_checkpoint"] == Path(source).name


# --- 10: docs offline ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_nothing_from_elsewhere(client, page) -> None:
    import re

    html = client.get(page).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200, (asset, r.status_code)  # a missing favicon.png is a 404, not a pass
        if asset.endswith(".png"):
            assert r.content.startswith(b"\x89PNG\r\n\x1a\n"), asset
        else:  # the scripts and styles themselves, not an error page
            assert len(r.content) > 1000, (asset, len(r.content))


# --- 5, 6: token budget per run, queue bounded by tokens, Retry-After ------------------------------------------


def test_runs_respect_the_token_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(1, 400, size=300))
    for overhead in (0, 32, 10_000):
        runs = plan_runs(lengths, 32, 1000, overhead)
        assert [i for lo, hi in runs for i in range(lo, hi)] == list(range(300))  # contiguous, in order, all
        for lo, hi in runs:
            assert hi - lo <= 32 and (hi - lo == 1 or (hi - lo) * lengths[hi - 1] <= 1000)
    assert estimate_tokens(["x" * 3000], None, 512) == 512
    assert estimate_tokens(["x" * 30, "y" * 3], ["z" * 30, ""], 512) == 23 + 4


def _cost(lengths, runs, overhead) -> float:
    return sum(overhead + (hi - lo) * lengths[hi - 1] for lo, hi in runs)


def test_runs_cut_padding_where_it_pays() -> None:
    """32 sentence-like lengths: no overhead -> one run per distinct length (no padding at all); a huge overhead
    -> one run (padded to the longest); in between, fewer padded tokens than one run and fewer runs than
    lengths; and never costlier than either extreme or than any cut into two runs."""
    rng = np.random.default_rng(1)
    lengths = np.sort(rng.integers(8, 70, size=32))
    free = plan_runs(lengths, 32, 4096, 0)
    assert sum((hi - lo) * lengths[hi - 1] for lo, hi in free) == lengths.sum()
    assert plan_runs(lengths, 32, 4096, 1e9) == [(0, 32)]
    runs = plan_runs(lengths, 32, 4096, 64)
    assert 1 < len(runs) < len(set(lengths.tolist()))
    best = _cost(lengths, runs, 64)
    assert best <= _cost(lengths, [(0, 32)], 64) and best <= _cost(lengths, free, 64)
    assert all(best <= _cost(lengths, [(0, k), (k, 32)], 64) for k in range(1, 32))
    assert plan_runs(lengths, 8, 4096, 1e9) == [(0, 8), (8, 16), (16, 24), (24, 32)]


class _Row:
    def __init__(self, n: int) -> None:
        self.ids = [1] * n


class _FakeModel:
    """tokenize/pad/run as OnnxClassifier has them, with a run that can be held."""

    def __init__(self, run) -> None:
        self.run = run
        self.sent_on = 0

    def tokenize(self, texts, pairs=None, *, truncation=True):
        return [_Row(4) for _ in texts]

    def pad(self, rows):
        return {"input_ids": np.ones((len(rows), max(len(r.ids) for r in rows)), dtype=np.int64)}


def test_long_inputs_run_in_budgeted_runs(bundle, reference) -> None:
    """64 inputs at the model's max length: every onnxruntime run stays within max_batch_tokens, and the
    answers are the reference's (each input cut at the manifest's 160 tokens)."""
    model = load_model(bundle)
    real_run, shapes = model.classifier.run, []
    model.classifier.run = lambda enc: (shapes.append(enc["input_ids"].shape), real_run(enc))[1]
    texts = [" ".join(["wonderful"] * (100 + i)) for i in range(64)]
    with TestClient(create_app(model, ServeSettings(max_batch_tokens=512, max_wait_ms=1))) as c:
        wait_ready(c)
        shapes.clear()
        got = c.post("/v1/classify", json={"texts": texts, "raw_scores": True}).json()["results"]
    assert shapes and all(rows * width <= 512 for rows, width in shapes), shapes
    assert sum(rows for rows, _ in shapes) == 64
    want = reference.logits(texts)
    np.testing.assert_allclose([[r["scores"][name] for name in reference.labels] for r in got], want, rtol=0, atol=1e-4)


def test_queue_bounded_by_tokens_with_retry_after() -> None:
    gate, entered = threading.Event(), threading.Event()

    def run(enc):
        entered.set()
        gate.wait(30)
        return np.zeros((len(enc["input_ids"]), 2), dtype=np.float32)

    async def scenario() -> tuple[int, str]:
        settings = ServeSettings(max_batch_size=4, max_wait_ms=0, max_queue=10_000, max_queue_tokens=2000)
        batcher = MicroBatcher(_FakeModel(run), settings, Metrics(), max_length=512)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(["a"], None, True))  # taken, then held in the model
            while not entered.is_set():
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(batcher.submit(["x" * 3000] * 3, None, True))  # 3 x 512 tokens wait
            await asyncio.sleep(0)
            with pytest.raises(Overloaded) as exc:
                await batcher.submit(["x" * 3000], None, True)
            gate.set()
            await asyncio.gather(first, queued)
            return exc.value.retry_after, str(exc.value)
        finally:
            gate.set()
            await batcher.stop()

    retry_after, message = asyncio.run(scenario())
    assert 1 <= retry_after <= 60 and "tokens are queued" in message


def test_429_says_when_to_retry(bundle, monkeypatch) -> None:
    with serving(bundle) as c:

        async def full(*args, **kwargs):
            raise Overloaded("about 70000 tokens are queued (max 65536); retry later", 7)

        monkeypatch.setattr(c.app.state.batcher, "submit", full)
        r = c.post("/predict", json={"inputs": "a"})
        assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.json()["error_type"] == "Overloaded"


# --- 4: the work of a client that left is not done --------------------------------------------------------------


def _scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}


def test_gone_clients_inputs_are_not_run(bundle) -> None:
    """3 requests of 64 long inputs whose clients disconnect while the first batch runs: only the run already
    in the model finishes; the other 184 inputs are never run (they all were before), and the next request
    is answered at once."""
    model = load_model(bundle)
    real_run = model.classifier.run
    rows_run: list[int] = []
    gate, entered, hold = threading.Event(), threading.Event(), {"on": False}

    def run(enc):
        rows_run.append(len(enc["input_ids"]))
        if hold["on"]:
            entered.set()
            gate.wait(30)
        return real_run(enc)

    model.classifier.run = run  # the batcher calls model.run at run time
    app = create_app(model, ServeSettings(max_batch_size=8, max_wait_ms=1))
    long_texts = [" ".join(["wonderful"] * 200)] * 64

    async def call(body: dict, leave: asyncio.Event) -> list[dict]:
        pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            if pending:
                return pending.pop()
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(_scope("/predict"), receive, send)
        return sent

    async def scenario() -> list[dict]:
        async with app.router.lifespan_context(app):
            for _ in range(3000):  # warm-up
                if app.state.service.ready:
                    break
                await asyncio.sleep(0.01)
            assert app.state.service.ready
            rows_run.clear()
            hold["on"] = True
            leave = asyncio.Event()
            calls = [asyncio.ensure_future(call({"inputs": long_texts}, leave)) for _ in range(3)]
            for _ in range(3000):
                if entered.is_set():
                    break
                await asyncio.sleep(0.01)
            assert entered.is_set(), "the model never started"
            leave.set()  # all three clients hang up
            await asyncio.wait_for(asyncio.gather(*calls), 30)
            hold["on"] = False
            gate.set()
            for _ in range(3000):  # the worker finishes the run it was in, then finds nothing to do
                if app.state.batcher.queued_inputs == 0 and not app.state.batcher._queue.qsize():
                    break
                await asyncio.sleep(0.01)
            stay = asyncio.Event()
            return await asyncio.wait_for(call({"inputs": ["a fine movie"]}, stay), 30)

    answer = asyncio.run(scenario())
    assert answer[0]["status"] == 200
    assert rows_run[:1] == [8] and sum(rows_run) == 8 + 1, rows_run  # the run in flight, then the next request


# --- 3, 1, 2, 7: a real uvicorn process on loopback ---------------------------------------------------------------


class _Proc(ServerProcess):
    """The server with the given settings (environment variables), started and ready."""

    def __init__(self, bundle: Path, **env: str) -> None:
        super().__init__(bundle, "--max-wait-ms", "2", **env)
        self.wait_ready()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def peak_rss_mb(self) -> float:
        return self.status_kb("VmHWM") / 1024

    def status_kb(self, field: str) -> int:
        """A field of /proc/PID/status in kB: VmHWM (peak RSS), VmSize (address space), ..."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field + ":")).split()[1])


TIMEOUTS = dict(LAYERPRUNE_SERVE_TIMEOUT_HEADER_S="1", LAYERPRUNE_SERVE_TIMEOUT_BODY_S="1",
                LAYERPRUNE_SERVE_TIMEOUT_KEEP_ALIVE_S="1", LAYERPRUNE_SERVE_TIMEOUT_SHUTDOWN_S="3")


@pytest.fixture(scope="module")
def timeout_server(bundle):
    srv = _Proc(bundle, **TIMEOUTS)
    try:
        yield srv
    finally:
        srv.stop()
    srv.assert_no_traceback()  # hostile clients, timeouts and the fuzz: all handled, none crashed a handler


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's 30 s timeout bounds it)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_silent_client_is_closed(timeout_server) -> None:
    with timeout_server.connect() as sock:
        assert _read_until_closed(sock) == b""


def test_partial_headers_are_closed(timeout_server) -> None:
    with timeout_server.connect() as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        assert _read_until_closed(sock) == b""


def test_dripped_headers_are_closed(timeout_server) -> None:
    """Slowloris: a byte every 0.2 s would take 40 s for these headers; the 1 s header deadline ends it."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 160 + b"\r\n\r\n"
    with timeout_server.connect() as sock:
        sent = 0
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            time.sleep(0.2)
        assert sent < len(head)


def test_partial_body_gets_408_and_is_closed(timeout_server) -> None:
    with timeout_server.connect() as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\": ")
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"did not arrive within 1 s" in reply


def test_idle_keep_alive_is_closed(timeout_server) -> None:
    with timeout_server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"status":"ok"}')


def test_shutdown_drain_is_bounded(bundle) -> None:
    """SIGTERM while a client holds a partial body (body timeout far away) and another sends nothing: the
    server still exits, after at most timeout_shutdown_s of drain (it does not stay up), without a traceback,
    and answers the half-sent request 503."""
    srv = _Proc(bundle, LAYERPRUNE_SERVE_TIMEOUT_BODY_S="600", LAYERPRUNE_SERVE_TIMEOUT_HEADER_S="600",
                LAYERPRUNE_SERVE_TIMEOUT_SHUTDOWN_S="2")
    socks = []
    try:
        slow = srv.connect()
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"inputs\": \"")
        socks += [slow, srv.connect()]
        time.sleep(0.5)  # the partial body is being read
        srv.proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its shutdown is done: -15 is a clean, graceful exit here
        assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = srv.log()
        assert "timeout graceful shutdown exceeded" in log and "Finished server process" in log, log[-2000:]
        srv.assert_no_traceback()  # the cancelled body read ends quietly
        answer = _read_until_closed(slow)  # the client still sending is told the server is going away
        assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer, answer[:500]
    finally:
        for s in socks:
            s.close()
        srv.stop()


def _body_of(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def test_pipelined_requests_of_a_client_that_leaves_log_no_traceback(timeout_server) -> None:
    """2 and 3 POSTs sent at once on one connection, which then closes: the request running and the ones
    queued behind it all learn that the client left, so none writes to the closed transport."""
    body = json.dumps({"inputs": ["a fine movie " * 20] * 32}).encode()
    request = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
               % len(body)) + body
    for pipelined in (2, 3, 2, 3):
        with timeout_server.connect() as sock:
            sock.sendall(request * pipelined)
        time.sleep(0.2)
    for _ in range(2):  # queued behind the ones above: once answered, those have been run and answered too
        assert httpx.post(f"{timeout_server.url}/predict", json={"inputs": "a"}, timeout=60).status_code == 200
    timeout_server.assert_no_traceback()


def _send_until_answered(sock: socket.socket, first: bytes, piece: bytes, most: int) -> bytes:
    """`first`, then `piece` again and again (at most `most` bytes) until the server answers or closes; then
    all it sends. Each piece waits for the server to have read the last, so nothing is left unread when it
    closes (an unread byte would turn its close into a reset that can eat its answer)."""
    sock.sendall(first)
    sent = 0
    while sent < most and not select.select([sock], [], [], 0.05)[0]:
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    return _read_until_closed(sock)


def test_a_head_over_the_byte_limit_is_431(bundle) -> None:
    """50 clients at once, each sending a header that does not end (up to 4 MB each): each gets TEI's JSON 431
    once its head passes 64 KiB, and the server's memory grows by far less than what they sent (httptools
    keeps a header being received in memory whole)."""
    srv = _Proc(bundle)
    try:
        idle = srv.peak_rss_mb()

        def flood(_: int) -> bytes:
            with srv.connect() as sock:
                return _send_until_answered(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"a" * 16384, 4 << 20)

        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(flood, range(50)))
        for reply in replies:
            assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
            assert _body_of(reply) == {"error": "the request's head is larger than 65536 bytes", "error_type": "Validation"}
        grown = srv.peak_rss_mb() - idle
        assert grown < 64, grown  # 50 x 64 KiB heads, and their parser buffers
        assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    finally:
        srv.stop()
    srv.assert_no_traceback()


def test_idle_connections_never_hide_health(bundle) -> None:
    """1,030 idle connections, over max_connections (1024): the health probes are answered still, as GET and
    HEAD; a request to the model gets TEI's JSON 503 with Retry-After; once they go, the model answers."""
    srv = _Proc(bundle, LAYERPRUNE_SERVE_TIMEOUT_HEADER_S="600")  # the idle ones stay open
    idle = []
    try:
        idle = [srv.connect() for _ in range(1030)]
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            for probe in ["/health", "/healthz", "/readyz"]:
                assert http.get(probe).status_code == 200, probe
                assert http.head(probe).status_code == 200, probe
            r = http.post("/predict", json={"inputs": "a"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json() == {"error": "the server holds 1024 connections, its most; retry", "error_type": "Unhealthy"}
        for sock in idle:
            sock.close()
        for _ in range(300):  # the server sees the closes as its loop gets to them
            r = httpx.post(f"{srv.url}/predict", json={"inputs": "a"}, timeout=30)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
    finally:
        for sock in idle:
            sock.close()
        srv.stop()
    srv.assert_no_traceback()


def test_a_pair_bomb_is_answered_under_a_memory_cap(pair_bundle, pair_reference) -> None:
    """64 pairs of two 10,000-character texts of 5,000 words (1.3 MB, within every limit) to a server whose
    address space is capped 1.5 GiB above what it holds idle: a 200 with the reference's logits, and the
    server stays up. Longest-first truncation builds every overflow piece of both texts and every pair of
    them (thousands of encodings a pair) unless the texts are cut first."""
    import resource

    srv = _Proc(pair_bundle)
    try:
        cap = srv.status_kb("VmSize") * 1024 + (1536 << 20)
        resource.prlimit(srv.proc.pid, resource.RLIMIT_AS, (cap, cap))
        assert resource.prlimit(srv.proc.pid, resource.RLIMIT_AS) == (cap, cap)
        text = ("w " * 5000)[:10000]
        r = httpx.post(f"{srv.url}/v1/classify", json={"pairs": [[text, text]] * 64, "raw_scores": True}, timeout=600)
        assert r.status_code == 200, r.text[:300]
        got = np.array([[row["scores"][label] for label in pair_reference.labels] for row in r.json()["results"]])
        np.testing.assert_allclose(got, np.repeat(pair_reference.logits([text], [text]), 64, axis=0), rtol=0, atol=1e-4)
        assert srv.proc.poll() is None and httpx.get(f"{srv.url}/healthz", timeout=30).status_code == 200
        assert srv.status_kb("VmHWM") * 1024 < cap
    finally:
        srv.stop()
    srv.assert_no_traceback()


def test_the_largest_valid_bodies_cost_a_small_multiple_and_are_given_back(pair_bundle) -> None:
    """4 requests at once of the largest a valid request can be on a pair model (64 pairs of 10,000 emoji,
    each escaped to 12 bytes: 15.4 MB): answered 200, the server's peak grows by under 4 times what was sent,
    and idle a second later it gives what the burst freed back to the system (glibc keeps it otherwise)."""
    srv = _Proc(pair_bundle)
    try:
        idle = srv.status_kb("VmRSS") / 1024
        body = json.dumps({"inputs": [["\U0001f600" * 10_000] * 2] * 64}).encode()
        assert len(body) > 15_300_000

        def post(_: int) -> int:
            return httpx.post(f"{srv.url}/predict", content=body, headers={"content-type": "application/json"},
                              timeout=600).status_code

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(post, range(4))) == [200] * 4
        sent_mb = 4 * len(body) / 2**20
        assert srv.peak_rss_mb() - idle < 4 * sent_mb, (idle, srv.peak_rss_mb(), sent_mb)
        for _ in range(100):  # polled: the server gives memory back after IDLE_S without a request
            if srv.status_kb("VmRSS") / 1024 < idle + 32:  # measured: ~6 MB above idle; ~50 kept without
                break
            time.sleep(0.1)
        assert srv.status_kb("VmRSS") / 1024 < idle + 32, (idle, srv.status_kb("VmRSS") / 1024)
    finally:
        srv.stop()
    srv.assert_no_traceback()


# --- the fuzz: 1,000+ generated requests, only 2xx/4xx, bounded answers and /metrics ------------------------------

_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("ab \u00e9\u4e2d\U0001f600\x00\n\"\\\ud800\udfff"), max_size=300),
    st.sampled_from(["", "x" * 10_001, "word " * 3000]),
)
_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), _text,
)
_json = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(
        ["inputs", "texts", "pairs", "truncate", "raw_scores", "truncation_direction", "junk", "\ud800"]), inner,
        max_size=4)), max_leaves=12)


@st.composite
def _bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["plausible", "any", "broken", "huge", "raw"]))
    if kind == "plausible":
        key = draw(st.sampled_from(["inputs", "texts", "pairs"]))
        body = {key: draw(_json)}
        if draw(st.booleans()):
            body[draw(st.sampled_from(["truncate", "raw_scores", "truncation_direction"]))] = draw(_json)
        value: object = body
    elif kind == "huge":
        value = {"texts": ["a"], draw(st.sampled_from(["extra", "inputs", "x" * 1000])): "y" * draw(
            st.sampled_from([10_000, 300_000, 1_500_000]))}
    elif kind == "raw":
        return draw(st.sampled_from([b"NaN", b"Infinity", b'{"inputs": -Infinity}', b'{"inputs": 1e999}', b"\xff\xfe",
                                     b"[" * 50_000, b'{"inputs": "\\ud800"}', b"", b"null", b'{"inputs": ["a"' * 3]))
    else:
        value = draw(_json)
    raw = json.dumps(value, allow_nan=True).encode()
    if kind == "broken":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))] + draw(st.sampled_from([b"", b"}", b"\x00", b"\xed\xa0\x80"]))
    return raw


_STANDARD_METHODS = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
# Methods llhttp (httptools, uvicorn's C parser) knows; any other token is an invalid request line to it.
_HTTPTOOLS_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "COPY", "LOCK",
                      "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND", "UNBIND", "ACL",
                      "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE",
                      "PURGE", "MKCALENDAR", "LINK", "UNLINK", "SOURCE", "QUERY"}
_WRONG_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b", "application/xml",
                "", None]
_OTHER_ROUTES = ["/v1/models", "/metrics", "/nowhere", "/predict/../v1/classify", "/%ff", "/docs"]


@st.composite
def _requests(draw) -> tuple[str, str, str | None, bytes]:
    """Mostly JSON POSTs to the two classify routes (where the parsing and validation are); the rest spread
    over standard and random methods, wrong content types and other routes."""
    roll = draw(st.integers(0, 9))
    method = ("POST" if roll < 8 else draw(st.sampled_from(_STANDARD_METHODS)) if roll == 8
              else draw(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_-!", min_size=1, max_size=12)))
    route = draw(st.sampled_from(["/predict", "/v1/classify"])) if draw(st.integers(0, 9)) < 8 \
        else draw(st.sampled_from(_OTHER_ROUTES))
    roll = draw(st.integers(0, 9))
    content_type = ("application/json" if roll < 7 else "application/json; charset=utf-8" if roll == 7
                    else draw(st.sampled_from(_WRONG_TYPES)))
    return method, route, content_type, draw(_bodies())


def test_fuzz_1000_requests(timeout_server) -> None:
    statuses: dict[int, int] = {}
    metrics_before = len(httpx.get(f"{timeout_server.url}/metrics", timeout=30).content)

    with httpx.Client(base_url=timeout_server.url, timeout=60) as http:

        @settings(max_examples=1100, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(request=_requests())
        def one(request: tuple[str, str, str | None, bytes]) -> None:
            method, route, content_type, body = request
            headers = {} if content_type is None else {"content-type": content_type}
            r = http.request(method, route, content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (method, route, content_type, body[:300], r.text[:300])
            if r.status_code >= 400 and method != "HEAD":
                assert len(r.content) <= MAX_ERROR_BYTES, (route, len(r.content))
                if method not in _HTTPTOOLS_METHODS:  # httptools' parser refuses it before the app: 400, TEI's body
                    assert r.status_code == 400, (method, r.text)
                    assert r.json() == {"error": "invalid HTTP request", "error_type": "Validation"}, (method, r.text)
                    return
                assert r.json()["error"]

        one()
        assert http.get("/readyz").status_code == 200
    timeout_server.assert_no_traceback()  # a 4xx answered after a crash inside the server is not a pass
    sent = sum(statuses.values())
    assert sent >= 1000, statuses
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 700, statuses
    metrics = httpx.get(f"{timeout_server.url}/metrics", timeout=30).text
    series = [line for line in metrics.splitlines() if line.startswith("layerprune_requests_total")]
    assert len(series) <= 60 and len(metrics) < metrics_before + 20_000, (len(series), len(metrics))
    peak = timeout_server.peak_rss_mb()
    print(f"\nfuzz: {sent} requests, statuses {dict(sorted(statuses.items()))}, /metrics {len(metrics)} bytes "
          f"({len(series)} request series), server peak RSS {peak:.0f} MB")
    providers = httpx.get(f"{timeout_server.url}/info", timeout=30).json()["providers"]  # what actually runs
    if providers[0] == "CPUExecutionProvider":  # measured 132 MB with the tiny test model
        assert peak < 800, peak
    else:  # CUDA's libraries alone are over a GB; the bound is the CPU provider's
        assert peak < 8000, (providers, peak)


@pytest.mark.parametrize("place", ["under-a-file", "proc"])
def test_triton_unwritable_place_is_one_error(bundle, tmp_path, place) -> None:
    """The library call too (the CLI checks first): no NotADirectoryError / FileNotFoundError traceback."""
    from layerprune.errors import LayerpruneError
    from layerprune.serve.triton import write_triton_repository

    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "repo" if place == "under-a-file" else Path("/proc/layerprune-test/repo")
    with pytest.raises(LayerpruneError, match="cannot write the model repository"):
        write_triton_repository(bundle, out)


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", None, True), ("::", None, True), ("", None, True),
                                               ("0.0.0.0", "k", False), ("127.0.0.1", None, False),
                                               ("localhost", None, False), ("::1", None, False),
                                               ("127.1", None, False), ("0x7f.0.0.2", None, False)])
def test_warns_when_reachable_without_a_key(bundle, monkeypatch, caplog, host, key, warned) -> None:
    """Loopback is judged by the address bound: 127.1 and 0x7f.0.0.2 are 127.0.0.1 and 127.0.0.2 (inet_aton's
    short forms); "" binds every interface."""
    import uvicorn

    from layerprune.serve.main import run

    configs = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: configs.append((self.config, sockets)))
    with caplog.at_level("WARNING", logger="layerprune.serve"):
        assert run(bundle, ServeSettings(host=host, port=0, api_key=key)) == 1  # never started: run was replaced
    assert ("WITHOUT an API key" in caplog.text) == warned, caplog.text
    config, sockets = configs[0]  # uvicorn gets the timeouts; the protocol the limits
    assert (config.timeout_keep_alive, config.timeout_graceful_shutdown, config.limit_concurrency) == (5, 10, None)
    protocol = config.http
    assert (protocol.head_timeout, protocol.max_head_bytes, protocol.max_connections) == (10, 65_536, 1024)
    assert all(sock.fileno() == -1 for sock in sockets)  # closed when run returns
