FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY k2_shared_token ./k2_shared_token
COPY examples ./examples
RUN pip install --no-cache-dir .
USER nobody
CMD ["python", "examples/worker.py"]
