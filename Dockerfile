# fhir-gateway: slim Python image, non-root user, runs `fhir-gateway serve`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_PROFILES_DIR=/app/profiles \
    GATEWAY_DATABASE_URL=sqlite+aiosqlite:////data/gateway.db

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY mappers ./mappers
COPY profiles ./profiles
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app gateway \
    && mkdir -p /data && chown gateway /data

USER gateway
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz').status == 200 else 1)"
CMD ["fhir-gateway", "serve"]
