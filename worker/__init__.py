"""The GPU worker: Celery app and task, model host, prompt encoding, generation and scoring."""

from . import threads

threads.apply()  # before anything imports torch
