# syntax=docker/dockerfile:1
# Multi-stage: build a wheel with its dependencies, then run it slim, as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --upgrade pip build \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUTHPROXY_CONFIG=/etc/authproxy/authproxy.yaml
RUN useradd --system --uid 10001 --home-dir /var/lib/authproxy --create-home authproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/authproxy.example.yaml /etc/authproxy/authproxy.example.yaml
USER authproxy
WORKDIR /var/lib/authproxy
# The proxy port and the admin port (metrics, health, admin API). In a container, listen
# on 0.0.0.0 and set proxy_auth: the proxy warns at start when it is reachable without it.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys,urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["authproxy"]
CMD ["run"]
