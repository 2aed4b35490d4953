# The service image: gunicorn serving tf_files/demo (or MODEL_PATH) on port 8000, as uid 10001,
# able to run with a read-only root filesystem (it writes only to its two volumes, TEMP_DIR and
# FEEDBACK_DIR, and /tmp). Sizes, timings and the run flags: docs/DEPLOY.md.
#
# Build: `make docker`. The base image is taken by digest, never by a tag that can move:
# scripts/docker_base.sh prints the immutable reference to build on (BASE_IMAGE's default below
# where a registry is reachable; the local stand-in's image id where none is) and `make docker`
# passes it as --build-arg BASE_IMAGE. `scripts/docker_base.sh --pin` writes the digest that
# python:3.11-slim has now into the default below (docs/DEPLOY.md, "Updating the base image").
#
# Stage 1 installs requirements.txt (serving only: one TensorFlow, tensorflow-cpu, no TF Hub, no
# training or test tools) into a venv, checks it (`pip check`), adds TF Serving's gRPC stubs
# (tensorflow-serving-api's package folder alone: its wheel requires the full `tensorflow`, so it
# is installed without its requirements and unregistered, as `make venv` does), and drops what
# serving never loads: TensorFlow's C++ headers (for building custom ops), the static symbol
# tables of its shared libraries (the dynamic symbols stay), libclang's 63 MB library (TensorFlow
# lists libclang for its build tools; nothing in TensorFlow, Keras or the service imports
# `clang`), the packages' own test suites, and pip itself (nothing is installed at run time).
# Stage 2 carries that venv and the service's files, nothing else.
# A default of @sha256:UNPINNED means no digest is recorded yet (the checkout was made where no
# registry is reachable, so the real one could not be read): a plain `docker build .` then fails
# rather than build on whatever the tag gives today.
ARG BASE_IMAGE=python:3.11-slim@sha256:UNPINNED

FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends binutils >/dev/null \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -q -r /tmp/requirements.txt \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip install -q --no-deps --no-compile --target /tmp/tfserving-api \
        tensorflow-serving-api==2.21.0 \
    && cp -r /tmp/tfserving-api/tensorflow_serving /opt/venv/lib/python3.11/site-packages/ \
    && rm -rf /tmp/tfserving-api \
    && /opt/venv/bin/pip uninstall -q -y pip \
    && cd /opt/venv/lib/python3.11/site-packages \
    && rm -rf tensorflow/include clang/native/libclang.so \
    && find tensorflow -type f -name '*.so*' -exec strip --strip-unneeded {} + \
    && find . -mindepth 2 -type d -name tests -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}

ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="image-classifier" \
      org.opencontainers.image.description="Image classification over HTTP: Flask + gunicorn + TensorFlow" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE"

# ONNX Runtime's telemetry off: its Linux builds upload usage events and keep a device id under
# $XDG_CACHE_HOME or $HOME (on a read-only root: a warning at every start, "Failed to persist
# telemetry device ID"); a server sends nothing it was not asked to.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    TEMP_DIR=/app/temp \
    FEEDBACK_DIR=/app/feedback \
    ORT_DISABLE_TELEMETRY=1

RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv

# The service's files only, owned by root and read-only for the service user. It writes to two
# folders, both owned by it and declared volumes, so that they are writable with --read-only
# even when the run names no volume for them: temp/ (uploads, capped by TEMP_MAX_MB) and
# feedback/ (labelled images for retraining: give it a named volume to keep them).
WORKDIR /app
COPY app.py gunicorn.conf.py ./
COPY common/ common/
COPY templates/ templates/
COPY static/ static/
COPY tf_files/demo/ tf_files/demo/
RUN python -m compileall -q /app \
    && mkdir temp feedback && chown 10001:10001 temp feedback
VOLUME ["/app/temp", "/app/feedback"]

USER 10001:10001
# 8000: HTTP (PORT); 8500: gRPC (GRPC_PORT), TF Serving's and Triton's port for it.
EXPOSE 8000 8500
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"

CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
