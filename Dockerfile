# CPU image by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 for CUDA.
# EXTRAS: the package's extras, int8 by default (onnxruntime + onnx) so that EMBED_QUANTIZE=int8 and
# `embedding-gateway int8 build` run in this image; --build-arg EXTRAS= leaves them out.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=int8
# EMBED_ONNX_CACHE_DIR: the int8 cache (README "int8 on CPU"), a volume built once by
# `embedding-gateway int8 build` and mounted read-only by the serving pods - never $HOME.
ENV PYTHONUNBUFFERED=1 HF_HOME=/models EMBED_HOST=0.0.0.0 EMBED_ONNX_CACHE_DIR=/onnx
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch>=2.4"
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY encoder encoder
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" && mkdir -p /onnx && chmod 1777 /onnx
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8001/readyz').status != 200)"
CMD ["embedding-gateway", "serve"]
