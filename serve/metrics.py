"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class Metrics:
    def __init__(self, routes: frozenset[str] = frozenset()) -> None:
        """routes: the paths the app answers on (`app.served_paths`), each its own label; any other is 'other'."""
        self.routes = routes
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "layerprune_requests", "HTTP requests by route and status", ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "layerprune_request_seconds", "request latency by route", ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        # The series keep their published names (dashboards and alerts read them); in code they are named
        # after what they count: rows and padded length of one onnxruntime run, inputs waiting in the queue.
        self.run_rows = Histogram(
            "layerprune_batch_size", "inputs per onnxruntime run", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.run_padded_length = Histogram(
            "layerprune_batch_padded_length", "padded token length per onnxruntime run", registry=self.registry,
            buckets=(8, 16, 32, 64, 128, 256, 512),
        )
        self.queued_inputs = Gauge("layerprune_queue_depth", "inputs waiting for the model", registry=self.registry)
        self.inputs = Counter("layerprune_inputs", "inputs classified", registry=self.registry)
        self.fallback_inputs = Counter("layerprune_fallback_inputs", "inputs the original model answered because "
                                       "the pruned one was unsure (a bundle exported with --fallback)",
                                       registry=self.registry)
        # real vs padding tokens run: how much of the model's work the length-aware runs still waste
        self.tokens = Counter("layerprune_tokens", "tokens run through the model", ["kind"], registry=self.registry)
        self.phase = Histogram(
            "layerprune_request_phase_seconds", "time per request in tokenization, queue and inference (as TEI's "
            "te_request_*_duration)", ["phase"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )

    def route_label(self, path: str) -> str:
        return path if path in self.routes else "other"

    @staticmethod
    def method_label(method: str) -> str:
        """Any token is a valid HTTP method: label only the standard ones, or the series never stop growing."""
        return method if method in METHODS else "other"

