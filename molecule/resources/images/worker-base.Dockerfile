# Stands in for the NVIDIA CUDA base image of comfyui-worker on machines without a
# registry: the same OS-level tools, no CUDA. Passed to the worker build as BASE_IMAGE.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
      python3 python3-venv python3-pip curl libgomp1 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
