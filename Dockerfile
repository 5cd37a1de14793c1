# syntax=docker/dockerfile:1
# loopwatch: a slim, non-root image.
#
#   docker build -t loopwatch .
#   docker run -p 8080:8080 -p 127.0.0.1:9900:9900 -e LOOPWATCH_ADMIN__TOKEN="$(openssl rand -hex 32)" \
#       loopwatch run --upstream ws://backend:8000
#   (or -e LOOPWATCH_UPSTREAM=ws://backend:8000 with the default command)
#
# Settings come from flags, a mounted file (--config) or LOOPWATCH_* variables.
# The image is a plain install (no extras), so every subcommand runs in it, e.g.
# the demo backend that config/examples/docker-compose.yml puts behind loopwatch:
#
#   docker run -p 8000:8000 loopwatch demo-backend --listen 0.0.0.0:8000

# Build a wheel and its dependencies' wheels, so the runtime stage needs no compiler
# and carries no pip cache or build tools. cargo (copied from the official Rust image, the
# version `make rust-check` uses) builds the compiled data plane, proxy/dataplane/py, with
# setuptools-rust; the C compiler is for the ring crate (rustls' cryptography).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=rust:1.95-slim /usr/local/rustup /usr/local/rustup
COPY --from=rust:1.95-slim /usr/local/cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY proxy ./proxy
COPY detectors ./detectors
COPY dashboards ./dashboards
COPY loopwatch ./loopwatch
COPY config/__init__.py config/loopwatch.yaml ./config/
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && ls /wheels/loopwatch-*-cp3*-linux_*.whl

# loopwatch's wheel and its dependencies only: no extras (tests/test_wheel.py
# installs the same wheel the same way and runs every subcommand).
FROM python:3.11-slim
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin loopwatch

# In a container the admin port (health, metrics, API) must be reachable from
# outside the container, not on the loopback default; publish it only where needed.
# Listening beyond loopback, it answers probes and scrapes by any name, but takes
# no changes (403 on release, cooldown, reset, reload) until LOOPWATCH_ADMIN__TOKEN
# is set, and says so in a warning at start (docs/admin-api.md, "Who may call it").
ENV LOOPWATCH_LISTEN=0.0.0.0:8080 \
    LOOPWATCH_ADMIN__LISTEN=0.0.0.0:9900 \
    PYTHONUNBUFFERED=1

USER 10001:10001
EXPOSE 8080 9900

# The slim image has no curl; Python's standard library does the request (past
# any http_proxy in the environment: the port is the container's own). A
# non-2xx answer raises, which fails the check. The port is LOOPWATCH_ADMIN__LISTEN's:
# move the admin port with that variable (not --admin-listen or a config file's
# admin.listen, which this check cannot see), or override HEALTHCHECK.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('LOOPWATCH_ADMIN__LISTEN', ':9900').rpartition(':')[2]; urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

ENTRYPOINT ["loopwatch"]
CMD ["run"]
