# specpipe image: one image for all three processes (coordinator, draft worker, target worker).
# Two build targets; the default (last) one is `cuda`:
#
#   docker build -t specpipe:cuda .                 # CUDA torch (cu128 wheels): for GPU hosts and pods
#   docker build --target cpu -t specpipe:cpu .     # CPU torch, a much smaller image
#
# The CUDA image carries the CUDA runtime (inside torch's wheels) but not the driver: the host needs
# the NVIDIA driver (CUDA 12.8: 570 or newer) and the NVIDIA container toolkit, which mounts the
# driver into the container (`--gpus`, or the Kubernetes device plugin). NVIDIA_REQUIRE_CUDA makes
# the toolkit refuse to start the container on an older driver, with the reason.
#
# Models are not baked in: mount them read-only. Examples (the GPU numbers are the host's):
#
#   # everything in one container, target on GPU 0 and draft on GPU 1 of the host:
#   docker run --rm --gpus all --shm-size 1g -p 50051:50051 -v /srv/models:/models:ro specpipe:cuda \
#       serve --host 0.0.0.0 --target /models/target --draft /models/draft \
#             --target-device cuda:0 --draft-device cuda:1 --dtype bfloat16
#   # the demo pair, which ships in the image, on the CPU:
#   docker run --rm -p 50051:50051 specpipe:cpu serve --host 0.0.0.0
#   # a draft worker alone (another host; serve then runs with --draft-addr tcp://THIS_HOST:50061):
#   docker run --rm --gpus '"device=1"' -p 50061:50061 -v /srv/models:/models:ro --entrypoint python specpipe:cuda \
#       -m specpipe.draft_worker --model /models/draft --host 0.0.0.0 --device cuda \
#       --target-data-addr tcp://TARGET_HOST:50063
#
# `--host 0.0.0.0` is needed inside a container (the processes bind 127.0.0.1 by default) and `-p`
# publishes the port; publish it on the host's loopback (-p 127.0.0.1:50051:50051) unless clients
# come from elsewhere. launch/k8s runs this image on Kubernetes.

# Must equal the torch pin in constraints.txt, the tested one (tests/launch/test_deploy_files.py checks it).
ARG TORCH_VERSION=2.13.0

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Run as an unprivileged user (uid 1000: the Kubernetes manifests' runAsUser); model caches
# (Hugging Face, the demo pair) go under its home.
RUN useradd --create-home --uid 1000 specpipe
WORKDIR /src
# gRPC API, health (plain text, --health-port), draft worker, target worker, target data plane,
# metrics (specpipe.config's DEFAULT_*_PORT).
EXPOSE 50051 50052 50061 50062 50063 9090
ENTRYPOINT ["specpipe"]
CMD ["--help"]

# torch first, from its own index, in its own layer: it is the big one and changes least.
FROM base AS torch-cuda
ARG TORCH_VERSION
ARG CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --index-url "$CUDA_INDEX_URL" "torch==$TORCH_VERSION"
# Expose the GPUs and the driver's compute libraries to the container under the NVIDIA toolkit.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=12.8"

FROM base AS torch-cpu
ARG TORCH_VERSION
ARG CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$CPU_INDEX_URL" "torch==$TORCH_VERSION"

# Then the project (pip sees torch already satisfied and takes the rest from PyPI).
FROM torch-cpu AS cpu
COPY . .
RUN pip install .
USER specpipe
WORKDIR /home/specpipe

FROM torch-cuda AS cuda
COPY . .
RUN pip install .
USER specpipe
WORKDIR /home/specpipe
