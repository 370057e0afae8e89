# The booking service image: `python main.py` (the orchestrator) by default, and the demo
# upstreams with `command: ["upstream", "order", ...]` (see deployment/local/docker-compose.yaml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Dependencies in a layer of their own, rebuilt only when pyproject.toml changes: the base ones and
# the `postgres` extra (the deployments keep their sagas in PostgreSQL). Only the `orchestrator`
# package is packaged, and main.py runs the app folders (facade/, node/, handler/, topic/, dto/,
# pb/, upstream/) from this directory, so the project itself is not pip-installed.
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(*p["dependencies"], *p["optional-dependencies"]["postgres"], sep="\n")' > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it. /data holds the upstreams'
# SQLite ledgers (a volume in the compose stack).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
    && mkdir /data \
    && chown app:app /data

COPY . .
# Byte-code compiled once here: quicker starts, and nothing to write at run time.
RUN python -m compileall -q .

USER 10001:10001

# 10000: the orchestrator (gRPC); 9464: its Prometheus metrics (metrics.port);
# 50051, 50052: the order and payment upstreams.
EXPOSE 10000 9464 50051 50052

# The orchestrator's port; the upstream services override it (compose `healthcheck:`).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "orchestrator.healthcheck", "127.0.0.1:10000"]

# Exec form: python is PID 1 and gets SIGTERM itself, which starts the graceful shutdown.
ENTRYPOINT ["python", "main.py"]
