"""Dynamic micro-batching: one background task collects queued requests into a micro-batch; a worker thread
tokenizes it, sorts its rows by length, cuts them into length-aware runs and answers each request as soon as
the run holding its rows is done, so the event loop never blocks on the model."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from layerprune.errors import LayerpruneError

from .metrics import Metrics
from .settings import ServeSettings

log = logging.getLogger("layerprune.serve")
# A run's fixed cost in padded tokens until measured (or when the measurement is noise): a modest guess.
DEFAULT_RUN_OVERHEAD_TOKENS = 32.0
IDLE_S = 1.0  # this long without a request after some work, the memory freed is given back to the system


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def give_back_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). glibc keeps what a burst freed for
    reuse: its mmap threshold rises to the largest block freed, so the tokenizer's and onnxruntime's buffers of
    a burst of long inputs come from the heap and stay resident after it (figures: docs/serving.md, "Measured
    memory"). Under load it is never called."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Row(Protocol):
    """A token row (layerprune.runtime.TokenRow): its ids, unpadded."""

    ids: list[int]


class BatchModel(Protocol):
    """What the batcher needs of a model: layerprune.runtime.OnnxClassifier is one."""

    def tokenize(self, texts: list[str], pairs: list[str] | None = None, *, truncation: bool = True) -> list[Any]: ...

    def pad(self, rows: Sequence[Any]) -> dict[str, np.ndarray]: ...

    def run(self, encoding: dict[str, np.ndarray]) -> np.ndarray: ...

    sent_on: int  # rows its fallback sent on to the original model so far (0 without one)


class Overloaded(Exception):
    """The queue is full (inputs or estimated tokens); retry_after: seconds until it has likely drained."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenizerError(Exception):
    """The tokenizer could not read an input (tokenizers raises plain Exceptions)."""


@dataclass
class Answer:
    """A request's logits and where its time went (TEI's x-*-time headers)."""

    logits: np.ndarray
    tokens: int  # real tokens, no padding
    tokenization_s: float
    queue_s: float
    inference_s: float


@dataclass
class _Request:
    texts: list[str]
    pairs: list[str] | None
    truncate: bool
    tokens: int  # estimated, for the queue's token budget
    future: asyncio.Future = field(repr=False)
    submitted: float = field(default_factory=time.perf_counter)
    gone: bool = False  # the caller stopped waiting: its rows are not run (read by the worker thread)
    counted: bool = True  # still counted in the queue's length (queued_inputs, queued_tokens)


def estimate_tokens(texts: list[str], pairs: list[str] | None, max_length: int, truncate: bool = True) -> int:
    """Tokens the inputs will likely take, before tokenizing: about a token per 3 characters (English
    WordPiece/BPE average ~4; CJK ~1, hence the cap per input at max_length when truncating)."""
    second = pairs or [""] * len(texts)
    per = ((len(a) + len(b)) // 3 + 3 for a, b in zip(texts, second))
    return sum(min(n, max_length) if truncate else n for n in per)


def plan_runs(lengths: Sequence[int], max_rows: int, max_tokens: int, overhead: float) -> list[tuple[int, int]]:
    """Cut rows sorted by length (ascending) into contiguous runs [start, end) that minimise the estimated
    cost sum(overhead + rows x longest) of running them, each run at most max_rows rows and, unless a single
    row, at most max_tokens padded tokens (TEI's max_batch_tokens). overhead: a run's fixed cost in padded
    tokens. Dynamic programming over the cut points, O(len x max_rows).
    Why: a micro-batch of random sentences padded to its longest wastes much of a run on padding; one run per
    distinct length pays the fixed cost of a run too often (figures: see docs/results.md)."""
    n = len(lengths)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = int(lengths[end - 1])
        for size in range(1, min(max_rows, end) + 1):
            if size > 1 and size * longest > max_tokens:
                break
            cost = best[end - size] + overhead + size * longest
            if cost < best[end]:
                best[end], cut[end] = cost, end - size
    runs, end = [], n
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


def measure_run_overhead(model: BatchModel, repeats: int = 3) -> float:
    """A run's fixed cost in padded-token equivalents: the intercept / slope of time = a + b x rows x length,
    fitted on the best of `repeats` runs at four shapes (the tokenizer's output replicated). 16 to 1024."""
    short, long = model.tokenize(["warm up"]), model.tokenize([" ".join(["warm up"] * 24)])
    points = []
    for rows in ([short[0]], [long[0]], short * 16, long * 16):
        best = math.inf
        for _ in range(repeats):  # padding included: it is paid per run too
            start = time.perf_counter()
            model.run(model.pad(rows))
            best = min(best, time.perf_counter() - start)
        points.append((len(rows) * len(rows[0].ids), best))
    tokens, seconds = np.array(points, dtype=np.float64).T
    slope, intercept = np.polyfit(tokens, seconds, 1)
    if slope <= 0:
        return DEFAULT_RUN_OVERHEAD_TOKENS  # noise beat the signal
    # At least 16: a noisy fit near 0 would run every distinct length alone (per-run bookkeeping is not free).
    return float(min(1024.0, max(16.0, intercept / slope)))


class MicroBatcher:
    """Requests queue up as text. The worker thread tokenizes a micro-batch (up to max_batch_inputs inputs or
    max_wait_s after its first), sorts all rows by length, cuts them with `plan_runs` into runs of at most
    max_run_rows rows and max_run_tokens padded tokens, pads each run once (model.pad) and runs it (model.run);
    each request is answered when its last run is done. Rows of requests whose caller is gone are skipped.

    The limits are the settings' (ServeSettings, the one place they are declared); max_length is the model's."""

    def __init__(self, model: BatchModel, settings: ServeSettings, metrics: Metrics, *, max_length: int) -> None:
        self.model = model
        self.max_batch_inputs = settings.max_batch_size  # a micro-batch takes requests until it holds this many
        self.max_run_rows = settings.max_batch_size  # one onnxruntime run takes at most this many rows
        self.max_run_tokens = settings.max_batch_tokens  # ... and, unless a single row, this many padded tokens
        self.max_wait_s = settings.max_wait_ms / 1000.0
        self.max_queue_inputs = settings.max_queue
        self.max_queue_tokens = settings.max_queue_tokens
        self.max_length = max_length
        self.run_overhead_tokens = (DEFAULT_RUN_OVERHEAD_TOKENS if settings.run_overhead_tokens is None
                                    else settings.run_overhead_tokens)  # measured at warm-up when None
        self._metrics = metrics
        self._queue: asyncio.Queue[_Request] | None = None
        self._queued_inputs = 0  # inputs waiting
        self._queued_tokens = 0  # their estimated tokens
        self._tokens_per_s: float | None = None  # measured drain rate, for Retry-After
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._worked = False  # a micro-batch ran since memory was last given back

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._queue is not None:
            while not self._queue.empty():
                req = self._queue.get_nowait()
                if not req.future.done():
                    req.future.set_exception(RuntimeError("server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained at the measured rate (1 to 60)."""
        if not self._tokens_per_s:
            return 1
        return int(min(60, max(1, -(-self._queued_tokens // max(1, int(self._tokens_per_s))))))

    async def submit(self, texts: list[str], pairs: list[str] | None, truncate: bool) -> Answer:
        """The inputs' (len(texts), num_labels) logits and timings. Raises Overloaded when the queue is full,
        TokenizerError or LayerpruneError (too long without truncation) for this request's inputs. Cancelling
        the caller drops the request: its rows are not run, queued or in a micro-batch not yet run."""
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        tokens = estimate_tokens(texts, pairs, self.max_length, truncate)
        if self._queued_inputs + len(texts) > self.max_queue_inputs:
            raise Overloaded(f"{self._queued_inputs} inputs are queued (max {self.max_queue_inputs}); retry later",
                             self.retry_after())
        # Bounded by work, not count; a request is always taken when nothing waits, so none starves.
        if self._queued_tokens and self._queued_tokens + tokens > self.max_queue_tokens:
            raise Overloaded(f"about {self._queued_tokens} tokens are queued (max {self.max_queue_tokens}); retry later",
                             self.retry_after())
        req = _Request(texts, pairs, truncate, tokens, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(req)
        self._queued_inputs += len(texts)
        self._queued_tokens += tokens
        self._metrics.queued_inputs.set(self._queued_inputs)
        try:
            return await req.future
        except asyncio.CancelledError:
            req.gone = True  # a dropped request leaves nothing for the model to do
            req.future.cancel()
            self._uncount(req)
            raise

    def _uncount(self, req: _Request) -> None:
        if req.counted:
            req.counted = False
            self._queued_inputs -= len(req.texts)
            self._queued_tokens -= req.tokens
            self._metrics.queued_inputs.set(self._queued_inputs)

    async def _next(self, timeout: float | None) -> _Request | None:
        """The next request still wanted, or None when none came within `timeout` (None: wait)."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if not self._queue.empty():
                req = self._queue.get_nowait()
            elif deadline is None:
                req = await self._queue.get()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    req = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    return None
            if not req.gone:
                return req

    async def _collect(self) -> list[_Request]:
        """A micro-batch: the first request, then what comes within max_wait_s, up to max_batch_inputs inputs."""
        loop = asyncio.get_running_loop()
        first = await self._next(IDLE_S if self._worked else None)
        if first is None:  # idle a while after some work
            self._worked = False
            await loop.run_in_executor(self._executor, give_back_memory)
            first = await self._next(None)
        assert first is not None
        batch, size = [first], len(first.texts)
        deadline = loop.time() + self.max_wait_s
        while size < self.max_batch_inputs:
            req = await self._next(max(0.0, deadline - loop.time()))
            if req is None:
                break
            batch.append(req)
            size += len(req.texts)
        for req in batch:
            self._uncount(req)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            started = loop.time()
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch, loop)
            except Exception as exc:  # the model failed: every request still waiting hears why
                log.exception("inference failed on a micro-batch of %d requests", len(batch))
                for req in batch:
                    _settle(req.future, exc)
            self._measure(sum(r.tokens for r in batch if not r.gone), loop.time() - started)
            self._worked = True

    def _measure(self, tokens: int, seconds: float) -> None:
        if tokens and seconds > 0:
            rate = tokens / seconds
            self._tokens_per_s = rate if self._tokens_per_s is None else 0.8 * self._tokens_per_s + 0.2 * rate

    def _run_batch(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        """In the worker thread: tokenize every request, sort all rows by length, run the planned runs and
        answer each request (via the loop) once its rows are done. Runs whose every request is gone are
        skipped."""
        start = time.perf_counter()
        rows: list[Any] = []
        owners: list[int] = []
        tok_s: dict[int, float] = {}
        for k, req in enumerate(batch):
            if req.gone:  # nobody reads its answer
                continue
            t0 = time.perf_counter()
            try:
                got = self._tokenize(req)
            except Exception as exc:  # noqa: BLE001 - this request's error, not the batch's
                loop.call_soon_threadsafe(_settle, req.future, exc)
                continue
            tok_s[k] = time.perf_counter() - t0
            rows.extend(got)
            owners.extend([k] * len(got))
        if not rows:
            return
        lengths = np.array([len(r.ids) for r in rows])
        order = np.argsort(lengths, kind="stable")
        owners_arr = np.array(owners)
        owner = owners_arr[order]
        left = {k: int(np.count_nonzero(owner == k)) for k in tok_s}  # rows still to run, by request
        out: np.ndarray | None = None
        inference = dict.fromkeys(tok_s, 0.0)
        for lo, hi in plan_runs(lengths[order], self.max_run_rows, self.max_run_tokens, self.run_overhead_tokens):
            run = order[lo:hi]
            mine = set(owner[lo:hi].tolist())
            if all(batch[k].gone for k in mine):
                continue
            t0, sent = time.perf_counter(), self.model.sent_on
            logits = self.model.run(self.model.pad([rows[i] for i in run]))
            took = time.perf_counter() - t0
            self._metrics.fallback_inputs.inc(self.model.sent_on - sent)  # runs are serial here (warm-up timing aside)
            if out is None:
                out = np.zeros((len(rows), logits.shape[-1]), dtype=np.float32)
            out[run] = logits
            self._observe(len(run), lengths[run])
            for k in mine:
                inference[k] += took
                left[k] -= int(np.count_nonzero(owner[lo:hi] == k))
                if left[k] == 0 and not batch[k].gone:
                    answer = Answer(out[owners_arr == k], int(lengths[owners_arr == k].sum()), tok_s[k],
                                    start - batch[k].submitted, inference[k])
                    loop.call_soon_threadsafe(_settle, batch[k].future, answer)

    def _tokenize(self, req: _Request) -> list[Any]:
        try:
            return self.model.tokenize(req.texts, req.pairs, truncation=req.truncate)
        except LayerpruneError:  # too long without truncation
            raise
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions on odd input
            raise TokenizerError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    def _observe(self, rows: int, lengths: np.ndarray) -> None:
        m = self._metrics
        m.run_rows.observe(rows)
        m.run_padded_length.observe(int(lengths.max()))
        m.inputs.inc(rows)
        m.tokens.labels("real").inc(int(lengths.sum()))
        m.tokens.labels("padding").inc(int(lengths.max()) * rows - int(lengths.sum()))


def _settle(future: asyncio.Future, result: Answer | BaseException) -> None:
    """Answer a request's future unless it is already done (cancelled: its caller left)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
