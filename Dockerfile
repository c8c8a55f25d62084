# One image for every fedjet role (coordinator, worker, keys, replay); CPU torch by default.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
WORKDIR /app
RUN pip install --no-cache-dir "${TORCH_SPEC}" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY fedjet ./fedjet
RUN pip install --no-cache-dir .
ENTRYPOINT ["fedjet"]
