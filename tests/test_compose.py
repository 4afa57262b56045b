"""Static checks of the Docker deployment: structure, healthchecks, GPU reservations, an init in every
service, no published ports by default (and a head-host recipe that keeps them), no default passwords
and any character in them, one locked set of versions for the venv and the image, a non-root image.
`make compose-test` (.ci/compose-test) runs the same files on a real Docker engine."""

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
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == "redis-secret"  # a list: one argument, any characters
    assert command[command.index("--appendonly") + 1] == "yes"
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
        assert env["LORA_COMPARE_DATABASE_URL"].startswith("postgresql://lora@")  # no password in a URL
        assert env["LORA_COMPARE_DATABASE_PASSWORD"] == "pg-secret"
        assert env["LORA_COMPARE_BROKER_URL"].startswith("redis://") and "@" not in env["LORA_COMPARE_BROKER_URL"]
        assert env["LORA_COMPARE_BROKER_PASSWORD"] == "redis-secret"
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
        assert worker["environment"]["LORA_COMPARE_BROKER_URL"] == "redis://10.0.0.5:6379/0"
    expose = load("docker-compose.expose.yml", ENV)
    assert set(expose["services"]) == {"redis", "postgres"}


def test_cli_is_a_one_off_service() -> None:
    cli = load("docker-compose.yml", ENV)["services"]["cli"]
    assert cli["profiles"] == ["cli"]
    assert any(v.endswith(":/data:ro") for v in cli["volumes"])


def test_dockerfile_runs_unprivileged() -> None:
    lines = _dockerfile_lines()
    assert lines[0].startswith("FROM python:3.11")  # the Python CI tests; CUDA comes with torch's wheels
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0")
    assert 'ENTRYPOINT ["lora-compare"]' in lines


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.worker.yml"])
def test_workers_load_models_only_from_the_mounted_folder(name: str) -> None:
    for worker in _workers(load(name, ENV)).values():
        command = worker["command"]
        assert command[command.index("--model-root") + 1] == "/data"


def _dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped, spaces collapsed."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    return [" ".join(ln.split()) for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(name: str) -> dict[str, str]:
    """Package -> pinned version; every entry `name==version` with at least one sha256 hash."""
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", (ROOT / name).read_text().strip()):
        if block.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+) \\\n", block)
        assert match, f"{name}: not a pinned requirement: {block[:80]}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), f"{name}: {match.group(1)} has no hash"
        assert _canonical(match.group(1)) not in pins, f"{name}: {match.group(1)} twice"
        pins[_canonical(match.group(1))] = match.group(2)
    return pins


TORCH_VERSION = "2.13.0"


def test_the_locks_pin_every_dependency_once_with_hashes() -> None:
    main, cuda = _lock("requirements.lock"), _lock("requirements-cuda.lock")
    assert not set(main) & set(cuda)
    assert cuda["torch"] == TORCH_VERSION and all(re.match(r"(nvidia|cuda|triton|torch)", n) for n in cuda)
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject[pyproject.index("dependencies = ["):pyproject.index("[project.scripts]")]
    wanted = {_canonical(re.split(r"[<>=!\[ ]", spec)[0]) for spec in re.findall(r'"([A-Za-z][^"]*)"', project)
              if not spec.startswith(("Apache",))}
    assert {"torch", "transformers", "peft", "celery", "pytest", "mypy"} <= wanted
    locked = set(main) | set(cuda) | set(_lock("requirements-harness.lock"))  # the harness extra's own lock
    assert wanted <= locked, f"not locked: {wanted - locked}"
    assert "setuptools" in main  # the editable install builds without isolation, from the lock


def test_the_harness_lock_adds_to_the_others_and_changes_none_of_their_pins() -> None:
    """requirements-harness.lock: lm-eval and what it needs beyond requirements.lock, resolved with it
    (.ci/lock.py), so `make venv` installs it on top with --no-deps and pip check passes."""
    harness = _lock("requirements-harness.lock")
    assert not set(harness) & (set(_lock("requirements.lock")) | set(_lock("requirements-cuda.lock")))
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'^harness = \["lm-eval\[hf\]==([0-9.]+)"\]', pyproject, re.M)
    assert pinned and harness["lm-eval"] == pinned.group(1)
    assert {"datasets", "evaluate", "scikit-learn"} <= set(harness)


def test_one_torch_version_everywhere() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH ?= torch=={TORCH_VERSION}\n" in makefile
    assert f'TORCH = "torch=={TORCH_VERSION}"' in (ROOT / ".ci/lock.py").read_text()
    assert any(f'"torch=={TORCH_VERSION}+$TORCH_VARIANT"' in ln for ln in _dockerfile_lines())
    assert f"WHEEL=torch-{TORCH_VERSION}+cpu-" in (ROOT / ".ci/compose-test").read_text()


def test_the_venv_and_the_image_install_the_locks_before_the_source() -> None:
    lines = _dockerfile_lines()
    installs = [i for i, ln in enumerate(lines) if "pip install" in ln]
    assert all("--no-deps" in lines[i] for i in installs)  # nothing resolved at build time
    cuda = next(i for i in installs if "--require-hashes -r /tmp/lock/requirements-cuda.lock" in lines[i])
    main = next(i for i in installs if lines[i] == "RUN python -m pip install --no-deps --require-hashes -r "
                "/tmp/lock/requirements.lock")
    source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY contract"))
    assert lines.index("COPY requirements-cuda.lock /tmp/lock/") < cuda < lines.index(
        "COPY requirements.lock /tmp/lock/") < main < source  # a code change reuses the dependency layers
    project = next(i for i in installs if i > source)
    assert "-e ." in lines[project] and "pip check" in lines[project]
    makefile = (ROOT / "Makefile").read_text()
    assert "$(STAMP): pyproject.toml requirements.lock requirements-harness.lock\n" in makefile
    recipe = makefile[makefile.index("$(STAMP):"):makefile.index("touch $(STAMP)")]
    assert recipe.index("--no-deps --require-hashes -r requirements.lock") < recipe.index("$(TORCH)")
    assert "--no-deps --no-build-isolation -e '.[dev]'" in recipe and "pip check" in recipe
    # the harness (tests only) after the project, checked with the rest; the image never installs it
    assert recipe.index("-e '.[dev]'") < recipe.index("--no-deps --require-hashes -r requirements-harness.lock") \
        < recipe.index("pip check")
    assert "requirements-harness" not in (ROOT / "Dockerfile").read_text()
    assert not (ROOT / ".dockerignore").read_text().count("\ndocker\n")  # docker/wheels/ reaches the build


def test_this_environment_runs_the_locked_versions() -> None:
    """What `make venv` installed is the lock (a venv built before a lock change is rebuilt by make:
    its stamp depends on requirements.lock)."""
    from importlib import metadata

    wrong = {}
    for name, version in _lock("requirements.lock").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a marker excludes it on this Python (async-timeout before 3.11.3)
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed: {wrong}; run make venv"
    assert metadata.version("torch").split("+")[0] == TORCH_VERSION


def _all_services() -> dict[str, Any]:
    services = dict(load("docker-compose.yml", ENV)["services"])
    services.update({f"extra {k}": v for k, v in load("docker-compose.worker.yml", ENV)["services"].items()})
    return services


def test_every_service_has_an_init() -> None:
    """PID 1 without an init ignored SIGTERM while the worker started: `docker compose stop` took 120 s."""
    for name, service in _all_services().items():
        assert service.get("init") is True, f"{name} has no init"


def test_the_head_host_recipe_keeps_the_published_ports() -> None:
    """`-f a -f b up -d` on one command, then a plain `docker compose run` recreated Redis and PostgreSQL
    without their ports. The recipe is COMPOSE_FILE in .env: every command then merges the same files."""
    example = (ROOT / ".env.example").read_text()
    line = next(ln for ln in example.splitlines() if ln.lstrip("#").startswith("COMPOSE_FILE="))
    files = line.lstrip("#").split("=", 1)[1].split(":")
    assert files == ["docker-compose.yml", "docker-compose.expose.yml"]
    merged = load(files[0], ENV)
    for name, service in load(files[1], {**ENV, "HEAD_BIND": "10.0.0.1"})["services"].items():
        merged["services"][name] = {**merged["services"][name], **service}
    assert merged["services"]["redis"]["ports"] == ["10.0.0.1:6379:6379"]
    assert merged["services"]["postgres"]["ports"] == ["10.0.0.1:5432:5432"]
    deploying = (ROOT / "docs/deploying.md").read_text()
    assert "COMPOSE_FILE=docker-compose.yml:docker-compose.expose.yml" in deploying
    assert "-f docker-compose.expose.yml up" not in deploying


class _ResetLoader(yaml.SafeLoader):
    pass


_ResetLoader.add_constructor("!reset", lambda loader, node: None)


def test_the_cpu_override_changes_only_the_device() -> None:
    base = load("docker-compose.yml", ENV)["services"]["worker-gpu0"]["command"]
    override = yaml.load(interpolate((ROOT / "docker/docker-compose.cpu.yml").read_text(), ENV), _ResetLoader)
    worker = override["services"]["worker-gpu0"]
    assert worker["deploy"] is None  # `!reset {}`: no GPU reservation
    device = base.index("--device") + 1
    assert worker["command"][device] == "cpu" and base[device] == "cuda"
    assert worker["command"][:device] + worker["command"][device + 1:] == base[:device] + base[device + 1:]


PG_PASSWORD, REDIS_PASSWORD = "p@ss/w#rd$%:1 x", "r@d/s#$%:2"


def test_passwords_with_any_character_reach_the_servers_unchanged() -> None:
    from kombu.utils.url import url_to_parts
    from sqlalchemy.engine import make_url

    from contract.settings import Settings

    env = {**ENV, "POSTGRES_PASSWORD": PG_PASSWORD, "REDIS_PASSWORD": REDIS_PASSWORD}
    for name in ("docker-compose.yml", "docker-compose.worker.yml"):
        for worker in _workers(load(name, env)).values():
            settings = Settings.from_env({k: str(v) for k, v in worker["environment"].items()})
            db = make_url(settings.database_url)
            assert (db.username, db.password, db.database) == ("lora", PG_PASSWORD, "lora")
            assert db.host in ("postgres", "10.0.0.5") and db.port == 5432
            broker = url_to_parts(settings.broker_url)
            assert (broker.password, broker.port) == (REDIS_PASSWORD, 6379)
            assert broker.hostname in ("redis", "10.0.0.5")
    services = load("docker-compose.yml", env)["services"]
    assert REDIS_PASSWORD in services["redis"]["command"]
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == PG_PASSWORD
    example = (ROOT / ".env.example").read_text()
    assert "openssl rand -hex" in example and "single quotes" in example


def test_a_password_protected_redis_and_postgresql_accept_such_passwords(tmp_path: Path) -> None:
    """Real servers: a private redis-server with `--requirepass` and the shared PostgreSQL (trust
    authentication, so this proves the URL still names the right host, user and database)."""
    import subprocess

    from sqlalchemy import text

    from contract.queue import check_broker, make_client
    from contract.settings import with_password
    from db.engine import make_engine
    from tests.cluster import free_port
    from tests.waiting import wait_until

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass",
                             REDIS_PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = with_password(f"redis://127.0.0.1:{port}/0", REDIS_PASSWORD)

        def answers() -> bool:
            try:
                check_broker(make_client(url))
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_until(answers, 20, "the password-protected redis-server to answer")
        wrong = with_password(f"redis://127.0.0.1:{port}/0", "wrong")
        with pytest.raises(Exception):  # noqa: B017 - the password is really checked
            check_broker(make_client(wrong))
    finally:
        proc.terminate()
        proc.wait(10)
    engine = make_engine(with_password("postgresql://postgres@127.0.0.1:5432/postgres", PG_PASSWORD))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_user, current_database()")).one() == ("postgres", "postgres")
    engine.dispose()
