# Image of the Python side (worker, dashboard, simulator); docker-compose.yml runs it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LOYALTY_STATE_DIR=/data

RUN pip install --no-cache-dir uv

WORKDIR /app
# Dependencies first (cached layer), from the lock, without the dev/test groups.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-default-groups --no-install-project
COPY streams ./streams
COPY metrics ./metrics
COPY infra ./infra
RUN uv sync --frozen --no-default-groups \
    && useradd --system --create-home loyalty \
    && mkdir -p /data && chown loyalty /data

USER loyalty
VOLUME ["/data"]
EXPOSE 6066 8080
CMD ["loyalty", "worker"]
