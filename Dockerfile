# One image for every fedjet role (coordinator, worker, keys, replay); CPU torch by default, a CUDA
# build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 (docker-compose.gpu.yml).
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
WORKDIR /app
RUN pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY fedjet ./fedjet
RUN pip install --no-cache-dir .
ENTRYPOINT ["fedjet"]
