"""The GPU worker: Celery app and task, model host, prompt encoding, generation and scoring."""
