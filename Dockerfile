# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target serve -t calibclust:serve .   # slim CPU serving/demo image, no torch
#   docker build --target train -t calibclust:train .   # CUDA image: training, export, TensorRT
# The install commands are the README's (pip install with the named extras).

ARG PYTHON_VERSION=3.11

# ---- build: one wheel of calibclust (calibclust, calibclust.export, calibclust.serve) ----
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY calibclust ./calibclust
COPY export ./export
COPY serve ./serve
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- serve: onnxruntime + gradio, no torch ----
FROM python:${PYTHON_VERSION}-slim AS serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --find-links /wheels "calibclust[serve,demo]==0.1.0" \
    && rm -rf /wheels \
    && useradd --create-home --uid 1000 calibclust
USER 1000
WORKDIR /home/calibclust
# Mount or copy an exported model to /models/model.onnx (calibclust export onnx ...), and pass a
# login: docker run -e CALIBCLUST_DEMO_AUTH=user:password (the demo refuses 0.0.0.0 without one).
ENV CALIBCLUST_MODEL=/models/model.onnx
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]
CMD ["sh", "-c", "calibclust demo --model \"$CALIBCLUST_MODEL\" --host 0.0.0.0 --port 7860"]

# ---- train: CUDA, torch, onnxruntime-gpu, TensorRT ----
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS train
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
# The CUDA base image pins the distribution; its python3 is the one that distribution ships.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --find-links /wheels "calibclust[train,export-gpu,serve-gpu,tensorrt]==0.1.0" && rm -rf /wheels
WORKDIR /work
ENTRYPOINT ["calibclust"]
CMD ["--help"]
