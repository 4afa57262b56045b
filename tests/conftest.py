"""Shared fixtures: real SQLite files, a real PostgreSQL database per test, the real demo model."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from contract.settings import Settings

#: The PostgreSQL server the tests use (CI starts it): a fresh database is made per test.
PG_ADMIN_URL = os.environ.get("LORA_COMPARE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = f"lc_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql+psycopg://", "postgresql://")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def demo_model(settings: Settings) -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the user's cache (downloads it the first time)."""
    from worker.demo_model import prepare_demo_model

    return prepare_demo_model(settings.demo_model_dir)


@pytest.fixture(scope="session")
def test_adapters(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real LoRA adapters of different ranks and target modules, with seeded random weights."""
    from tests.adapters import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        "attn": make_adapter(demo_model, root / "attn", rank=4, targets=["q_proj", "v_proj"], seed=1),
        "mlp": make_adapter(demo_model, root / "mlp", rank=8, targets=["gate_proj", "up_proj", "down_proj", "o_proj"],
                            seed=2),
    }


ARITH_ROWS = [(12, 30), (7, 8), (55, 21), (90, 9), (33, 44), (61, 17), (25, 25), (48, 39)]


def write_arith_dataset(path: Path, rows: list[tuple[int, int]] = ARITH_ROWS) -> Path:
    import json

    path.write_text("".join(json.dumps({"a": a, "b": b, "answer": a + b}) + "\n" for a, b in rows))
    return path


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path
