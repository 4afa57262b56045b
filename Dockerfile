# lora-compare GPU worker and CLI image.
# Python 3.11 (the version CI tests) and exactly the locked versions, in layers that change from the
# slowest to the fastest: torch and its CUDA stack (requirements-cuda.lock, ~4 GB), every other
# dependency (requirements.lock, the file `make venv` installs too), then the project itself, editable,
# so a code change rebuilds only the last layers (seconds). Every install is --no-deps, the locks'
# hashes are checked, and `pip check` proves the set consistent. The CUDA libraries come as wheels
# with torch; the host needs only the NVIDIA driver and container toolkit.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    LORA_COMPARE_CACHE=/cache

WORKDIR /app

# torch 2.13.0, the version the tests run (Makefile's TORCH, requirements-cuda.lock). TORCH_VARIANT=cpu
# installs the CPU wheel of the same version from docker/wheels/ instead (a machine without a GPU;
# make compose-test), never a different version.
ARG TORCH_VARIANT=cuda
COPY requirements-cuda.lock /tmp/lock/
COPY docker/wheels/ /tmp/wheels/
RUN if [ "$TORCH_VARIANT" = cuda ]; then \
      python -m pip install --no-deps --require-hashes -r /tmp/lock/requirements-cuda.lock; \
    else \
      python -m pip install --no-deps --no-index --find-links /tmp/wheels "torch==2.13.0+$TORCH_VARIANT"; \
    fi && rm -rf /tmp/wheels

COPY requirements.lock /tmp/lock/
RUN python -m pip install --no-deps --require-hashes -r /tmp/lock/requirements.lock

# The project (the demo's config, dataset and adapter ship inside the package: producer/demo/;
# examples/ links to them). Only these folders: a change elsewhere does not rebuild anything.
COPY pyproject.toml README.md ./
COPY contract contract
COPY db db
COPY producer producer
COPY worker worker
COPY examples examples
RUN python -m pip install --no-deps --no-build-isolation -e . && python -m pip check

# Least privilege: the worker runs as an unprivileged user; models come in read-only under /data;
# the converted demo model and other caches go to /cache (a volume).
RUN useradd --create-home --uid 10001 lora && mkdir -p /cache /data && chown lora:lora /cache
USER lora

ENTRYPOINT ["lora-compare"]
CMD ["--help"]
