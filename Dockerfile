# The image every chuxin-ray training pod runs (Ray head, CPU and GPU workers, the job submitter).
#   docker build -t ghcr.io/my-org/chuxin-ray:0.1.0 .
#   helm install emb ./helm/chuxin-ray --set image.repository=ghcr.io/my-org/chuxin-ray
#
# Base: Ray 2.60 on CUDA 12.8 and Python 3.11 (tag form {ray}-py{python}-cu{cuda}), matching the
# `ray==2.60.0` pin and `requires-python` in pyproject.toml. It runs as `ray` (uid 1000, gid 100).
#
# The synthesis LLM does NOT run on this image: the chart's RayService uses the stock Ray LLM image
# (rayproject/ray-llm:2.60.0-py311-cu128), because vLLM pins its own torch and transformers>=5, which
# conflict with the training stack (FlagEmbedding 1.4.2 needs transformers<5).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# The base image's user; never root. Numeric so the kubelet can check runAsNonRoot.
USER 1000:100
WORKDIR /home/ray/chuxin-ray

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false

# Dependencies first, in their own layer, with exactly the pins of pyproject.toml's `dependencies`
# (tests/integration/test_dockerfile.py keeps the two lists equal). torch is pinned in the same pip
# call so nothing resolves another build. On Linux x86_64 the PyPI torch==2.13.0 wheel is the CUDA
# build and carries its own CUDA runtime libraries; the node needs only a recent NVIDIA driver.
RUN pip install \
        "torch==2.13.0" \
        "ray[default,train,data,serve]==2.60.0" \
        "transformers>=4.44.2,<5" \
        "sentence-transformers>=3,<6" \
        "FlagEmbedding==1.4.2" \
        "kubernetes==37.0.1" \
        "boto3>=1.34" \
        "pyarrow>=16" \
        "pydantic>=2.7,<3" \
        "pyyaml>=6" \
        "zstandard>=0.22" \
        "tokenizers>=0.19" \
        "sentencepiece>=0.2"

# The package itself; its dependencies are already in place, so pip changes nothing else.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 chuxin_ray ./chuxin_ray
RUN pip install --no-deps . \
    && chuxin-ray --version

# No credentials are baked in: object storage reads AWS_* from the pod's environment (a Secret
# reference or workload identity), and the Ray auth token comes from KubeRay at run time.
