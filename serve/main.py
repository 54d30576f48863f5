"""Entry points: `python -m serve BUNDLE ...` (main) and `run(bundle, settings)` for `layerprune serve`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from layerprune.errors import LayerpruneError

from .settings import ServeSettings, load_settings

DEFAULT_BUNDLE = Path("lp-run/bundle")
log = logging.getLogger("layerprune.serve")


def run(bundle: Path, settings: ServeSettings) -> int:
    """Gate the bundle, load it and serve until interrupted. Exit code: 0 after a clean shutdown,
    the error's code (2) with one line on stderr when the bundle is refused, 1 when uvicorn fails."""
    if settings.ray:
        from .ray_app import run_ray

        return run_ray(bundle, settings)
    import uvicorn

    from .app import create_app
    from .model import load_model
    from .protocol import protocol_with_header_timeout

    _configure_logging(settings.log_level)
    try:
        model = load_model(bundle, allow_unvalidated=settings.allow_unvalidated, threads=settings.threads,
                           memory_arena=settings.memory_arena)
    except LayerpruneError as exc:
        print(f"layerprune serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not model.validated:
        log.warning("serving %s WITHOUT a passed validation (--allow-unvalidated)", bundle)
    log.info(
        "serving %s (%s, %d of %d layers, %s input) on http://%s:%d, providers %s",
        bundle, model.model_id, model.manifest.kept_layers, model.manifest.total_layers,
        "pair" if model.pair_input else "single-text", settings.host, settings.port,
        model.classifier.session.get_providers(),
    )
    if settings.api_key is None and not _loopback(settings.host):
        log.warning("binding %s, reachable from other hosts, WITHOUT an API key: anyone who reaches it can use it "
                    "(set --api-key or LAYERPRUNE_SERVE_API_KEY)", settings.host)
    app = create_app(model, settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False, lifespan="on",
        log_config=None, http=protocol_with_header_timeout(settings.timeout_header_s),
        timeout_keep_alive=settings.timeout_keep_alive_s, timeout_graceful_shutdown=settings.timeout_shutdown_s,
        limit_concurrency=settings.max_connections,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve a layerprune ONNX bundle over HTTP.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve flags, for `python -m serve` and for a `layerprune serve` subcommand alike."""
    p.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE, help=f"bundle directory (default {DEFAULT_BUNDLE})")
    p.add_argument("--config", type=Path, help="settings file (default: configs/serve.yaml when present)")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int)
    p.add_argument("--allow-unvalidated", action="store_true", default=None,
                   help="serve a bundle whose validation did not pass (said on /v1/models and in the log)")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--max-inputs-per-request", type=int)
    p.add_argument("--max-chars-per-input", type=int)
    p.add_argument("--max-queue", type=int)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--max-batch-tokens", type=int, help="rows x padded length per onnxruntime run (TEI's)")
    p.add_argument("--ray", action="store_true", default=None,
                   help="serve as a Ray Serve deployment: same gate, routes and batching per replica")
    p.add_argument("--replicas", type=int, help="Ray Serve replicas (default 1)")
    p.add_argument("--max-replicas", type=int, help="Ray Serve autoscaling from --replicas up to this many")
    p.add_argument("--ray-address", help="Ray cluster to join ('auto'); default: a local Ray instance")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (better: LAYERPRUNE_SERVE_API_KEY, which "
                   "other users cannot see in the process list)")


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return load_settings(
        args.config, host=args.host, port=args.port, allow_unvalidated=args.allow_unvalidated,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_inputs_per_request=args.max_inputs_per_request, max_chars_per_input=args.max_chars_per_input,
        max_queue=args.max_queue, threads=args.threads, log_level=args.log_level, api_key=args.api_key,
        max_batch_tokens=args.max_batch_tokens, ray=args.ray, replicas=args.replicas, max_replicas=args.max_replicas,
        ray_address=args.ray_address,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except LayerpruneError as exc:
        print(f"layerprune serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return run(args.bundle, settings)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only its resolver knows; warn
        return False


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("layerprune.serve").setLevel(level.upper())
