# specpipe image: one image for all three processes (coordinator, draft worker, target worker).
#
#   docker build -t specpipe .                                  # CPU torch
#   docker build -t specpipe:cu128 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#
#   docker run specpipe serve --host 0.0.0.0 --target /models/target --draft /models/draft
#   docker run --entrypoint python specpipe -m specpipe.draft_worker --model /models/draft --host 0.0.0.0
#
# Models are not baked in: mount them (launch/k8s mounts a volume at /models).
FROM python:3.11-slim

# Where torch comes from: the CPU wheels by default; point it at a CUDA index for a GPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Must equal the torch pin in constraints.txt, the tested one (tests/launch/test_deploy_files.py checks it).
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# torch first, from its own index, in its own layer: it is the big one and changes least.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
# Then the project (pip sees torch already satisfied and takes the rest from PyPI).
COPY . .
RUN pip install .

# Run as an unprivileged user; model caches (Hugging Face, the demo pair) go under its home.
RUN useradd --create-home --uid 1000 specpipe
USER specpipe
WORKDIR /home/specpipe

# gRPC API, draft worker, target worker, target data plane (specpipe.config's DEFAULT_*_PORT).
EXPOSE 50051 50061 50062 50063

ENTRYPOINT ["specpipe"]
CMD ["--help"]
