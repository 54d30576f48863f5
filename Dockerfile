# Serving image for one layerprune bundle: CPU-only and torch-free (the serve path needs onnxruntime,
# tokenizers and the web stack, not torch/transformers).
#   docker build --build-arg BUNDLE=lp-run/bundle -t layerprune-serve .
#   docker run --rm -p 8080:8080 layerprune-serve
# Settings: LAYERPRUNE_SERVE_* environment variables (e.g. -e LAYERPRUNE_SERVE_MAX_BATCH_SIZE=64);
# an unvalidated bundle is refused at start unless -e LAYERPRUNE_SERVE_ALLOW_UNVALIDATED=true.
# It listens on every interface: require a key with -e LAYERPRUNE_SERVE_API_KEY=... (it warns at start without one).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    LAYERPRUNE_SERVE_PORT=8080

WORKDIR /app

# The serve extra's dependencies (pinned as tested), then the package itself without its training
# dependencies (torch, transformers, datasets, ...): --no-deps.
RUN pip install \
        "numpy==2.4.6" \
        "onnxruntime==1.32.0" \
        "tokenizers==0.22.2" \
        "pydantic==2.14.4" \
        "pydantic-settings==2.16.3" \
        "pyyaml==6.0.4" \
        "fastapi==0.165.0" \
        "starlette==1.10.0" \
        "uvicorn==0.54.0" \
        "httptools==0.9.0" \
        "uvloop==0.23.0" \
        "prometheus-client==0.26.0" \
        "fastapi-offline==1.7.7"

COPY pyproject.toml README.md ./
COPY layerprune ./layerprune
COPY serve ./serve
# The sources go once installed: the server runs as the installed layerprune.serve.
RUN pip install --no-deps . && rm -rf build *.egg-info layerprune serve

COPY configs/serve.yaml ./configs/serve.yaml

# The bundle, whole: the manifest hashes every file and the server checks them at start.
ARG BUNDLE=lp-run/bundle
COPY ${BUNDLE} /app/bundle

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin layerprune \
    && chmod -R a+rX /app
USER layerprune

EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('LAYERPRUNE_SERVE_PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

# Inside the container the server must listen on every interface (the default is loopback only).
CMD ["python", "-m", "layerprune.serve", "/app/bundle", "--host", "0.0.0.0"]
