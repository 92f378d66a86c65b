# media-proxy: serves Synapse's media from a cache backed by S3 (see compose.yaml for a stack).
#
#   docker build -t media-proxy .
#   docker run --user 991:991 -v synapse-data:/data:ro -v media-store:/data/media_store \
#       media-proxy serve --synapse-config /data/homeserver.yaml \
#       --synapse-url http://synapse:8008 --listen 0.0.0.0:8011

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY media_proxy ./media_proxy
# A virtualenv at the path it will keep in the final image: copied over whole, no compiler or
# build files follow it (every dependency ships binary wheels for CPython 3.11).
RUN python -m venv /opt/media-proxy \
    && /opt/media-proxy/bin/pip install . \
    && /opt/media-proxy/bin/media-proxy --version

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/media-proxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MEDIA_PROXY_HEALTH_URL=http://127.0.0.1:8011/_media_proxy/health
# The same uid/gid as Synapse's official image (991): the proxy writes files into Synapse's
# media store, and both must be able to read and delete what the other wrote.
RUN groupadd --system --gid 991 media-proxy \
    && useradd --system --uid 991 --gid 991 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin media-proxy
COPY --from=build /opt/media-proxy /opt/media-proxy
USER media-proxy:media-proxy
EXPOSE 8011

# No curl in slim images: python's urllib. urlopen raises on anything but 2xx, so a
# non-200 answer, a refused connection or a timeout all exit non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MEDIA_PROXY_HEALTH_URL'], timeout=4)"]

ENTRYPOINT ["media-proxy"]
CMD ["serve", "--synapse-config", "/data/homeserver.yaml", "--synapse-url", "http://synapse:8008", "--listen", "0.0.0.0:8011"]
