# CPU image: the same set-up script as the README (no second recipe to drift), then the
# quickstart as the default command.
#   docker build -t lit .
#   docker run --rm -v $PWD/runs:/app/runs lit                       # the quickstart
#   docker run --rm lit make test                                    # the test suite
# GPU variant: build FROM an NVIDIA CUDA base image with Python 3.11 (e.g. a
# nvidia/cuda:*-cudnn-runtime-ubuntu* image plus python3.11-venv), keep the rest as is, and run
# with `docker run --gpus all ...`: scripts/setup.sh sees nvidia-smi and installs the CUDA
# fbgemm-gpu instead of fbgemm-gpu-cpu.
FROM python:3.11-slim-bookworm

RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
# Installs Debian's dataset-fashion-mnist, the venv, torch, torchrec, the project, data packages.
RUN bash scripts/setup.sh && rm -rf /root/.cache/pip
ENV PATH=/app/.venv/bin:$PATH
CMD ["python", "-m", "lit", "fit", "--config", "configs/quickstart.yaml"]
