"""Real processes for the distributed tests: workers, a private Redis, a cuttable TCP proxy to PostgreSQL."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy import text

from db.engine import make_engine
from tests.waiting import wait_until

LORA = [sys.executable, "-c", "from producer.cli import main; main()"]
#: Workers load the test-only fault injection first (a no-op unless its environment variable is set).
LORA_WORKER = [sys.executable, "-c", "import tests.fault_injection; from producer.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lora(db_url: str, broker_url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The CLI as a real process."""
    return subprocess.run([*LORA, "--database-url", db_url, "--broker-url", broker_url, *args],
                          capture_output=True, text=True, timeout=timeout)


class Worker:
    """`lora-compare worker` as a real process, logging to a file."""

    def __init__(self, name: str, db_url: str, broker_url: str, queue: str, log_dir: Path, *,
                 visibility_timeout: int = 10, max_attempts: int = 3, env: dict[str, str] | None = None) -> None:
        self.name, self.db_url, self.broker_url, self.queue = name, db_url, broker_url, queue
        self.log_path = log_dir / f"{name}.log"
        self.visibility_timeout, self.max_attempts = visibility_timeout, max_attempts
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Worker:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*LORA_WORKER, "--database-url", self.db_url, "--broker-url", self.broker_url, "worker",
             "--device", "cpu", "--queues", self.queue, "--hostname", self.name,
             "--visibility-timeout", str(self.visibility_timeout), "--max-attempts", str(self.max_attempts)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 60) -> Worker:
        wait_until(lambda: self.log().count(f"{self.name} ready.") >= self.starts, timeout, f"worker {self.name}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RedisServer:
    """A private redis-server on its own port, persisting to a folder (so a restart keeps the queue)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--appendonly", "yes",
             "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 20, "redis to start")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
            self.proc.wait(timeout=20)


class TcpProxy:
    """Forwards a local port to PostgreSQL; `cut()` drops every connection and refuses new ones;
    `freeze()` is a silent network cut: every connection stays open and new ones are accepted, but no
    byte is forwarded either way until `thaw()` (connections accepted while frozen are closed then)."""

    def __init__(self, target_port: int = 5432) -> None:
        self.port, self.target_port = free_port(), target_port
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self._frozen = threading.Event()
        self._held: list[socket.socket] = []

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self._stopped.clear()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._frozen.is_set():
                with self._lock:
                    self._held.append(client)  # open, never answered: what a client sees across a cut
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                if self._frozen.is_set():
                    self._frozen_wait()
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                try:
                    sock.close()
                except OSError:
                    pass

    def cut(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for sock in self._conns:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
            self._conns.clear()

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            sock.close()

    def _frozen_wait(self) -> None:
        """Block a pipe while frozen (woken by `thaw`), without reading: bytes stay in the kernel's buffers."""
        while self._frozen.is_set() and not self._stopped.is_set():
            self._stopped.wait(0.2)

    def restore(self) -> None:
        self.start()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


def scalar(db_url: str, query: str, **params: object) -> object:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(query), params).scalar()
    finally:
        engine.dispose()


def rows(db_url: str, query: str, **params: object) -> list[tuple[object, ...]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params)]
    finally:
        engine.dispose()
