# The reward service: `docker compose up service` (GPU) or `docker compose --profile cpu up service-cpu`.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# dependencies first, so code changes do not reinstall torch
COPY pyproject.toml README.md ./
RUN mkdir -p rewarders prompter service t2i_reward \
    && touch rewarders/__init__.py prompter/__init__.py service/__init__.py t2i_reward/__init__.py \
    && pip install . && pip uninstall -y t2i-reward
COPY rewarders ./rewarders
COPY prompter ./prompter
COPY service ./service
COPY t2i_reward ./t2i_reward
RUN pip install --no-deps .

# a non-root user; models and the hub cache live on a volume so they survive rebuilds
RUN useradd --create-home --uid 1000 app && mkdir -p /cache && chown app /cache
USER app
ENV T2I_REWARD_CACHE_DIR=/cache/t2i-reward HF_HOME=/cache/huggingface \
    T2I_SERVICE_HOST=0.0.0.0 T2I_SERVICE_PORT=8000
VOLUME ["/cache"]
EXPOSE 8000

# ready = models loaded; the first start downloads the published checkpoints, hence the long start period
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1
CMD ["t2i-reward", "serve"]
