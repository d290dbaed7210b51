# Ferry's image: one image for the controller and node services (`ferry controller`,
# `ferry node`). The node service drives host tools, so they are installed here.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux mount e2fsprogs xfsprogs \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tools ./tools
COPY proto ./proto
COPY csi_driver ./csi_driver
# The build generates csi_driver/gen from proto/ (setup.py runs tools/gen_protos.py).
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /
# The node service must run privileged as root (loop devices, mounts); the
# controller needs no privileges and its Deployment drops them.
ENTRYPOINT ["ferry"]
