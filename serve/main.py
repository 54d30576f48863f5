"""Entry points: `python -m serve BUNDLE ...` (main) and `run(bundle, settings)` for `layerprune serve`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.files import DEFAULT_BUNDLE
from layerprune.options import add_options, cli_fields

from .settings import ServeSettings, load_settings

log = logging.getLogger("layerprune.serve")


def run(bundle: Path, settings: ServeSettings) -> int:
    """Bind the address, gate the bundle, load it and serve until interrupted. Exit code: 0 after a clean
    shutdown; the error's code (2) with one line on stderr when the address cannot be bound or the bundle is
    refused; 1 when uvicorn fails."""
    if settings.ray:
        from .ray_app import run_ray

        return run_ray(bundle, settings)
    import uvicorn

    from .app import create_app
    from .model import load_model
    from .protocol import hardened_protocol

    _configure_logging(settings.log_level)
    sockets: list[socket.socket] = []
    try:
        sockets = listen(settings.host, settings.port)  # first: a port in use is told before the model loads
        model = load_model(bundle, allow_unvalidated=settings.allow_unvalidated, threads=settings.threads,
                           memory_arena=settings.memory_arena)
    except LayerpruneError as exc:
        for sock in sockets:
            sock.close()
        print(f"layerprune serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not model.validated:
        log.warning("serving %s WITHOUT a passed validation (--allow-unvalidated)", bundle)
    log.info(
        "serving %s (%s, %d of %d layers, %s input) on http://%s:%d, providers %s",
        bundle, model.model_id, model.manifest.depth, model.manifest.total_layers,
        "pair" if model.pair_input else "single-text", settings.host, sockets[0].getsockname()[1],
        model.classifier.session.get_providers(),
    )
    if settings.api_key is None and not all(_loopback(sock) for sock in sockets):
        log.warning("binding %s, reachable from other hosts, WITHOUT an API key: anyone who reaches it can use it "
                    "(set --api-key or LAYERPRUNE_SERVE_API_KEY)", settings.host)
    app = create_app(model, settings)
    protocol = hardened_protocol(head_timeout=settings.timeout_header_s, max_head_bytes=settings.max_header_bytes,
                                 max_connections=settings.max_connections)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False, lifespan="on",
        log_config=None, http=protocol, timeout_keep_alive=settings.timeout_keep_alive_s,
        timeout_graceful_shutdown=settings.timeout_shutdown_s,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
    return 0 if server.started else 1


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` resolves to (as asyncio's create_server binds them), for
    uvicorn to listen on; a LayerpruneError in one line when one cannot be bound (a port in use, say)."""
    where = f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise LayerpruneError(f"cannot listen on {where}: {getattr(exc, 'strerror', None) or exc}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # each family on its own socket, as asyncio does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise LayerpruneError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sockets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve a layerprune ONNX bundle over HTTP.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve flags, for `python -m serve` and for a `layerprune serve` subcommand alike."""
    p.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE, help=f"bundle directory (default {DEFAULT_BUNDLE})")
    p.add_argument("--config", type=Path, help="settings file (default: configs/serve.yaml when present)")
    add_options(p, ServeSettings, layered=True)  # one flag per settings field marked cli(): None when not given


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Flags given > environment > settings file > defaults (a flag not given is None: load_settings skips it)."""
    return load_settings(args.config, **{name: getattr(args, name) for name in cli_fields(ServeSettings)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except LayerpruneError as exc:
        print(f"layerprune serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return run(args.bundle, settings)


def _loopback(sock: socket.socket) -> bool:
    """Whether the address a socket is bound to is loopback: the address itself, so 127.1 and localhost are."""
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("layerprune.serve").setLevel(level.upper())
