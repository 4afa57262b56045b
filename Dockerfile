# lora-compare GPU worker and CLI image.
# A CUDA PyTorch base image; then the project is installed the way the Makefile installs it (torch
# first, then the package, editable), minus the dev extras. The demo's config, dataset and adapter
# ship inside the package (producer/demo/); examples/ links to them, for users of the image.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    LORA_COMPARE_CACHE=/cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract contract
COPY db db
COPY producer producer
COPY worker worker
COPY examples examples
# torch is already in the base image and satisfies the project's torch>=2.2: pip keeps it.
RUN python -m pip install -e .

# Least privilege: the worker runs as an unprivileged user; models come in read-only under /data.
RUN useradd --create-home --uid 10001 lora && mkdir -p /cache /data && chown lora:lora /cache
USER lora

ENTRYPOINT ["lora-compare"]
CMD ["--help"]
