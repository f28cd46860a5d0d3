# CPU image by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 for CUDA.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 HF_HOME=/models EMBED_HOST=0.0.0.0
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch>=2.4"
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY encoder encoder
RUN pip install --no-cache-dir .
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8001/readyz').status != 200)"
CMD ["embedding-gateway", "serve"]
