"""The same server as a Ray Serve deployment: every replica runs the start-up gate on the bundle, then serves
the same FastAPI app (routes, micro-batcher, limits) as its ingress; Ray's proxy spreads requests over N
replicas, optionally autoscaled. Needs `pip install 'layerprune[ray]'`; nothing here imports ray until used.

    layerprune serve BUNDLE --ray --replicas 2                  # a local Ray instance on this host
    layerprune serve BUNDLE --ray --ray-address auto --replicas 4 --max-replicas 8   # a running Ray cluster
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from layerprune.bundle import servable_bundle
from layerprune.errors import LayerpruneError

from .settings import ServeSettings

log = logging.getLogger("layerprune.serve")
APP_NAME = "layerprune"


class Replica:
    """One replica: the gate and the onnxruntime session in __init__ (a refused bundle fails the replica, and
    Ray the deployment), then the app `create_app` builds, served by Ray as the replica's ASGI ingress."""

    def __init__(self, bundle: str, settings: dict[str, Any]) -> None:
        from .model import load_model

        self.settings = ServeSettings.model_validate(settings)
        # one onnxruntime thread per CPU Ray gives the replica (its default, every core, oversubscribes a host
        # running several replicas)
        self.model = load_model(Path(bundle), allow_unvalidated=self.settings.allow_unvalidated,
                                threads=self.settings.threads or 1, memory_arena=self.settings.memory_arena)

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve calls this after __init__, in the replica
        from .app import create_app

        return create_app(self.model, self.settings)


def deployment(bundle: Path, settings: ServeSettings) -> Any:
    """A bound Ray Serve application for the bundle: `serve.run(deployment(...))`."""
    from ray import serve

    scaling: dict[str, Any] = {"num_replicas": settings.replicas}
    if settings.max_replicas is not None:  # Ray's autoscaler between replicas and max_replicas
        scaling = {"autoscaling_config": {
            "min_replicas": settings.replicas, "max_replicas": max(settings.max_replicas, settings.replicas),
            # a replica batches up to max_batch_size inputs: keep about one batch in flight per replica
            "target_ongoing_requests": settings.max_batch_size,
        }}
    cls = serve.deployment(
        serve.ingress()(Replica), name=APP_NAME, max_ongoing_requests=settings.max_connections,
        ray_actor_options={"num_cpus": settings.threads or 1}, **scaling,
    )
    # The settings travel as plain data; the secret is revealed only to the replicas that check it.
    data = settings.model_dump(mode="json")
    data["api_key"] = settings.api_key.get_secret_value() if settings.api_key else None
    return cls.bind(str(Path(bundle).resolve()), data)


def run_ray(bundle: Path, settings: ServeSettings) -> int:
    """Gate the bundle here first (one line and exit 2 when refused, before Ray starts), start or join Ray,
    deploy, and serve until SIGINT/SIGTERM. Exit 1 when Ray is missing or the deployment fails."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("layerprune serve: error: --ray needs Ray Serve: pip install 'layerprune[ray]'", file=sys.stderr)
        return 1
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        servable_bundle(Path(bundle), allow_unvalidated=settings.allow_unvalidated)
    except LayerpruneError as exc:
        print(f"layerprune serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    ray.init(address=settings.ray_address, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=False)
    stop = _stop_on_signal()  # before deploying: a stop that arrives meanwhile is answered once it is done
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(deployment(bundle, settings), name=APP_NAME, route_prefix="/")
    except Exception as exc:  # noqa: BLE001 - Ray wraps the replica's error in its own types
        print(f"layerprune serve: error: the Ray Serve deployment failed: {_reason(exc)}", file=sys.stderr)
        _shutdown(ray, serve)
        return 2 if "BundleError" in str(exc) or "LayerpruneError" in str(exc) else 1
    log.info("serving %s on Ray Serve at http://%s:%d with %s replica(s)%s", bundle, settings.host, settings.port,
             settings.replicas, f", autoscaling to {settings.max_replicas}" if settings.max_replicas else "")
    stop.wait()
    _shutdown(ray, serve)
    return 0


def _reason(exc: Exception) -> str:
    """The line of Ray's error that says why (the replica's exception), not its traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    ours = [line for line in lines if "Error:" in line and ("layerprune" in line or "Bundle" in line)]
    return (ours or lines or [type(exc).__name__])[-1][:500]


def _stop_on_signal() -> threading.Event:
    """An event SIGINT/SIGTERM set. Installed before the deployment starts: a signal during `serve.run` (which
    blocks until every replica runs) would otherwise kill the process with Ray half started. A second signal
    stops waiting for the deployment."""
    stop = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    return stop


def _shutdown(ray: Any, serve: Any) -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
