# The image every pipeline process runs from (workers, Flower, the exporter, the CLI).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN pip install --no-cache-dir ".[metrics,archive]"
COPY config ./config
COPY tasks ./tasks
COPY flowerconfig.py ./
RUN useradd --create-home --uid 10001 pipeline && mkdir /archive && chown pipeline /archive
USER pipeline
ENV PYTHONUNBUFFERED=1
CMD ["celery", "-A", "config", "worker", "--loglevel=INFO"]
