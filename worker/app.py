"""The Celery app: configuration only (DESIGN.md: JSON, late acks, reject on worker lost, prefetch 1)."""

from __future__ import annotations

from celery import Celery

from contract.queue import DEFAULT_VISIBILITY_TIMEOUT_S, celery_settings

from .tasks import register_tasks


def create_app(broker_url: str, *, visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S) -> Celery:
    """A Celery app on `broker_url` with the chunk task registered (`memory://` for embedded mode)."""
    app = Celery("lora_compare", broker=broker_url, set_as_current=False)
    app.conf.update(celery_settings(visibility_timeout_s=visibility_timeout_s))
    register_tasks(app)
    return app
