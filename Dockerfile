# syntax=docker/dockerfile:1
# --- build: wheels for sluice and its dependencies ------------------------------
FROM python:3.11-slim AS build
# a C compiler lets setup.py compile the hot modules with mypyc (without one it installs pure Python)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md setup.py ./
COPY engine ./engine
COPY transforms ./transforms
COPY conformance ./conformance
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: non-root, config mounted or baked in --------------------------------
FROM python:3.11-slim
RUN useradd --system --create-home --uid 10001 sluice
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY routes.yaml ./
COPY channels ./channels
COPY transforms ./transforms
RUN mkdir -p /app/var && chown -R sluice:sluice /app
USER sluice
ENV SLUICE_LOG_FORMAT=json \
    SLUICE_HOST=0.0.0.0
EXPOSE 2575
VOLUME ["/app/var"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD python -c "import socket,sys; s=socket.create_connection(('127.0.0.1', 2575), 3); s.close()" || exit 1
ENTRYPOINT ["sluice"]
CMD ["run"]
