# One image for every service of docker-compose.yml: the library, its examples, gunicorn, celery.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY k2_shared_token ./k2_shared_token
COPY examples ./examples
RUN pip install --no-cache-dir . "gunicorn>=21" "celery>=5.3"
ENV PYTHONPATH=/app
USER nobody
CMD ["python", "examples/worker.py"]
