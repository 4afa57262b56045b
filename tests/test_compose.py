"""Static checks of the Docker deployment (no Docker engine runs here): structure, healthchecks,
GPU reservations, no published ports by default, no default passwords, a non-root image."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:\?|:-)([^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` (empty counts as unset), `$$` kept."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name, "")
        if value:
            return value
        if op == ":?":
            raise MissingVariable(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VAR.sub(replace, text)


def load(name: str, env: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(interpolate((ROOT / name).read_text(), env))


ENV = {"POSTGRES_PASSWORD": "pg-secret", "REDIS_PASSWORD": "redis-secret", "HEAD_HOST": "10.0.0.5"}


def test_compose_refuses_to_start_without_passwords() -> None:
    for name in ("docker-compose.yml", "docker-compose.worker.yml"):
        for missing in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
            env = {k: v for k, v in ENV.items() if k != missing}
            with pytest.raises(MissingVariable, match=missing):
                load(name, env)
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / "docker-compose.worker.yml").read_text()
    for match in _VAR.finditer(text):
        if "PASSWORD" in match.group(1):
            assert match.group(2) == ":?", f"{match.group(0)} must be required, with no default"
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["POSTGRES_PASSWORD"] == "" and example["REDIS_PASSWORD"] == ""


def test_services_healthchecks_persistence_and_no_published_ports() -> None:
    compose = load("docker-compose.yml", ENV)
    services = compose["services"]
    assert {"redis", "postgres", "worker-gpu0", "cli"} <= set(services)
    for name, service in services.items():
        assert "ports" not in service, f"{name} publishes a port by default"
    redis, postgres = services["redis"], services["postgres"]
    assert "--requirepass redis-secret" in redis["command"].replace('"', "")
    assert "--appendonly yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "pg-secret"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    for service in (redis, postgres):
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    for name in ("redis-data", "postgres-data", "model-cache"):
        assert name in compose["volumes"]


def _workers(compose: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in compose["services"].items() if k.startswith("worker")}


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.worker.yml"])
def test_one_worker_per_gpu(name: str) -> None:
    compose = load(name, ENV)
    workers = _workers(compose)
    assert workers
    device_ids = []
    for worker in workers.values():
        assert worker["command"][0] == "worker" and "--device" in worker["command"]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
        assert len(devices[0]["device_ids"]) == 1
        device_ids += devices[0]["device_ids"]
        assert any(v.endswith(":/data:ro") for v in worker["volumes"])
        env = worker["environment"]
        assert env["LORA_COMPARE_DATABASE_URL"].startswith("postgresql://lora:pg-secret@")
        assert env["LORA_COMPARE_BROKER_URL"].startswith("redis://:redis-secret@")
        assert worker["restart"] == "unless-stopped"
    assert len(set(device_ids)) == len(device_ids)  # each worker its own GPU


def test_head_workers_wait_for_healthy_services_and_extra_hosts_point_at_the_head() -> None:
    head = load("docker-compose.yml", ENV)
    for worker in _workers(head).values():
        assert worker["depends_on"] == {"redis": {"condition": "service_healthy"},
                                        "postgres": {"condition": "service_healthy"}}
        assert "@postgres:5432/" in worker["environment"]["LORA_COMPARE_DATABASE_URL"]
    extra = load("docker-compose.worker.yml", ENV)
    assert set(extra["services"]) == set(_workers(extra))  # workers only
    for worker in _workers(extra).values():
        assert "@10.0.0.5:5432/" in worker["environment"]["LORA_COMPARE_DATABASE_URL"]
        assert "@10.0.0.5:6379/" in worker["environment"]["LORA_COMPARE_BROKER_URL"]
    expose = load("docker-compose.expose.yml", ENV)
    assert set(expose["services"]) == {"redis", "postgres"}


def test_cli_is_a_one_off_service() -> None:
    cli = load("docker-compose.yml", ENV)["services"]["cli"]
    assert cli["profiles"] == ["cli"]
    assert any(v.endswith(":/data:ro") for v in cli["volumes"])


def test_dockerfile_installs_like_the_makefile_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in dockerfile.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0].startswith("FROM pytorch/pytorch:") and "cuda" in lines[0]
    assert "RUN python -m pip install -e ." in lines
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -e '.[dev]'" in makefile  # the same editable install, plus dev extras
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0")
    assert 'ENTRYPOINT ["lora-compare"]' in lines


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.worker.yml"])
def test_workers_load_models_only_from_the_mounted_folder(name: str) -> None:
    for worker in _workers(load(name, ENV)).values():
        command = worker["command"]
        assert command[command.index("--model-root") + 1] == "/data"
