"""Control-plane scale: chunk completions per minute and output rows per second as simulated workers
are added (1, 8, 32, 128), with where the time goes.

Each simulated worker is a real `lora-compare worker` process (Celery solo pool, the real task, leases,
heartbeat and sweeper) against real Redis and PostgreSQL, with generation replaced by an instant fake at
the model boundary (bench/simulated_worker.py). Runs go in through the real `lora-compare submit`.

For each worker count: start the workers still missing, submit a warm-up run (sizes the measured one),
then a measured run of about `--seconds` of work; the window is from its first claim (the earliest
`chunks.started_at`) to the run's end (`runs.finished_at`). By default the benchmark starts its own
PostgreSQL (max_connections sized for the workers; the shared server's 100 would not take 128 workers)
and its own Redis, in a temporary folder removed after; `--pg URL` / `--redis URL` use existing servers
instead (a throwaway database is created and dropped).

    .venv/bin/python bench/control_plane.py                       # the table: 1 8 32 128 workers
    .venv/bin/python bench/control_plane.py --tiny --pg postgresql://postgres@127.0.0.1:5432/postgres \\
        --redis redis://127.0.0.1:6379/3                          # a few seconds: the CI smoke test
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402

from db.engine import make_engine  # noqa: E402
from db.migrate import upgrade  # noqa: E402

LORA = [sys.executable, "-c", "from producer.cli import main; main()"]
WORKER = [sys.executable, str(REPO / "bench" / "simulated_worker.py")]
ADAPTER = REPO / "examples" / "adapters" / "arith"
CONFIG = """
name: {name}
model:
  base: demo
  adapters:
{adapters}
dataset:
  path: {data}
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
  limit: {limit}
generation:
  max_new_tokens: {new_tokens}
inference:
  chunk_size: {chunk_size}
scoring:
  match: numeric
"""
PHASES = ("claim", "read", "lookup", "planner", "gen", "write", "other")
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


# --- servers --------------------------------------------------------------------------------------


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PrivatePostgres:
    """A PostgreSQL server of its own (default settings but max_connections), in a temporary folder."""

    def __init__(self, folder: Path, max_connections: int) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        self.bin = Path(found[-1]).parent if found else Path(shutil.which("initdb") or "initdb").parent
        self.folder, self.port, self.max_connections = folder / "pg", free_port(), max_connections
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PrivatePostgres:
        self.folder.mkdir()
        if os.geteuid() == 0:  # initdb refuses root: the server runs as postgres
            shutil.chown(self.folder, "postgres")
        subprocess.run(_as_postgres([str(self.bin / "initdb"), "-D", str(self.folder), "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8"]), check=True, capture_output=True)
        self.proc = subprocess.Popen(
            _as_postgres([str(self.bin / "postgres"), "-D", str(self.folder), "-p", str(self.port),
                          "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
                          "-c", f"max_connections={self.max_connections}"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                        capture_output=True).returncode == 0, 60, "the private PostgreSQL")
        return self

    def postmaster(self) -> int | None:
        """The server's pid (the child of `runuser` when started as root)."""
        try:
            return int((self.folder / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        main = self.postmaster()
        return [] if main is None else [main, *_descendants(main)]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        main = self.postmaster()
        if main is not None:
            os.kill(main, signal.SIGINT)  # fast shutdown (runuser does not pass signals on)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class PrivateRedis:
    """A redis-server of its own, persisted as docker-compose.yml's (append-only, fsync every second)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
             "--maxclients", "10000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _redis_ping(self.port), 20, "the private Redis")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# --- CPU accounting from /proc -------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _named(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == name:
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK


def machine_cpu_seconds() -> float:
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for v in parts[:8]) - int(parts[3]) - int(parts[4])  # all but idle and iowait
    return busy / CLK


def pss_mib(pid: int) -> float:
    """A process's proportional set size (its private memory plus its share of pages it shares with
    others, such as the interpreter's and libraries' code): what it adds to the machine's memory."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


#: MiB kept free when deciding whether more simulated workers fit (the machine is shared).
RESERVE_MIB = 4096
#: MiB a simulated worker is assumed to need before one has been measured, its database connections included.
WORKER_MIB = 120


# --- the benchmark ------------------------------------------------------------------------------------


@dataclass
class Point:
    workers: int
    chunks: int = 0
    rows: int = 0
    window_s: float = 0.0
    steady_chunks_min: float = 0.0
    steady_rows_s: float = 0.0
    retried: int = 0
    status: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    phases_ms: dict[str, float] = field(default_factory=dict)  # wall
    phases_cpu_ms: dict[str, float] = field(default_factory=dict)  # the worker's main thread's CPU
    busy: float = 0.0
    rss_mib: float = 0.0  # PSS per worker
    pg_connections: int = 0

    @property
    def chunks_min(self) -> float:
        return 60 * self.chunks / self.window_s if self.window_s else 0.0

    @property
    def rows_s(self) -> float:
        return self.rows / self.window_s if self.window_s else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path, db_url: str, broker_url: str,
                 pg: PrivatePostgres | None, redis: PrivateRedis | None) -> None:
        self.args, self.folder, self.db_url, self.broker_url = args, folder, db_url, broker_url
        self.pg, self.redis = pg, redis
        self.queue = f"cpbench-{uuid.uuid4().hex[:8]}"
        self.timings = folder / "timings"
        self.timings.mkdir()
        self.logs = folder / "logs"
        self.logs.mkdir()
        self.engine = make_engine(db_url)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.adapters = self._adapters()
        self._runs = 0

    def _adapters(self) -> list[tuple[str, Path]]:
        """Copies of the demo adapter with distinct files (so distinct hashes and cache keys)."""
        out = []
        for i in range(self.args.adapters):
            target = self.folder / f"adapter{i + 1}"
            shutil.copytree(ADAPTER, target)
            config = json.loads((target / "adapter_config.json").read_text())
            config["revision"] = f"bench-copy-{i + 1}"
            (target / "adapter_config.json").write_text(json.dumps(config, indent=2))
            out.append((f"adapter{i + 1}", target))
        return out

    def _dataset(self, name: str, examples: int) -> Path:
        """A dataset of its own for each run: prompts no earlier run had, so nothing comes from the
        generation cache (every row is generated, as on a first evaluation)."""
        self._runs += 1
        path = self.folder / f"{name}.jsonl"
        with path.open("w") as out:
            for i in range(examples):
                a, b = self._runs * 10_000_000 + i, (i * 7919) % 1000
                out.write(json.dumps({"a": a, "b": b, "answer": a + b}) + "\n")
        return path

    def start_workers(self, count: int) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORA_COMPARE_BENCH_TIMINGS": str(self.timings),
               "PYTHONPATH": str(REPO)}
        first = len(self.workers)
        for i in range(first, count):
            name = f"sim{i:03d}@bench"
            log = (self.logs / f"{name}.log").open("ab")
            self.workers.append(subprocess.Popen(
                [*WORKER, "--database-url", self.db_url, "--broker-url", self.broker_url, "worker", "--queues",
                 self.queue, "--hostname", name], stdout=log, stderr=subprocess.STDOUT, env=env))
        if count > first:
            print(f"starting {count - first} simulated worker(s)", file=sys.stderr, flush=True)
        for i in range(first, count):
            path = self.logs / f"sim{i:03d}@bench.log"
            wait_for(lambda p=path, w=self.workers[i]: _ready(p, w), 600, f"worker {i} to start", interval=0.5)

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def submit(self, name: str, chunks: int) -> int:
        examples = chunks * self.args.chunk_size
        data = self._dataset(name, examples)
        config = self.folder / f"{name}.yaml"
        config.write_text(CONFIG.format(
            name=name, data=data, limit=examples, new_tokens=self.args.new_tokens,
            chunk_size=self.args.chunk_size,
            adapters="\n".join(f"    {n}: {p}" for n, p in self.adapters)))
        done = subprocess.run([*LORA, "--database-url", self.db_url, "--broker-url", self.broker_url, "submit",
                               str(config), "--queue", self.queue], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"submit failed: {done.stderr.strip()[-2000:]}")
        return int(done.stdout.strip().splitlines()[-1])

    def wait_started(self, name: str) -> int:
        def started() -> int | None:
            with self.engine.connect() as conn:
                row = conn.execute(text("SELECT id FROM runs WHERE name = :n AND started_at IS NOT NULL"),
                                   {"n": name}).first()
            return None if row is None else int(row[0])
        return int(wait_for(started, 900, f"run {name} to start", interval=0.05))

    def wait_done(self, run_id: int, timeout: float) -> str:
        def final() -> str | None:
            with self.engine.connect() as conn:
                status = conn.execute(text("SELECT status FROM runs WHERE id = :r"), {"r": run_id}).scalar()
            return status if status in ("completed", "failed", "cancelled") else None
        return str(wait_for(final, timeout, f"run {run_id} to finish", interval=0.1))

    def measure(self, workers: int) -> Point:
        self.start_workers(workers)
        tag = uuid.uuid4().hex[:6]
        if self.args.tiny:  # no warm-up: a fixed, small run
            chunks = 2 * workers
        else:  # a warm-up run (every worker's first chunk) sizes the measured run
            warm_chunks = max(2 * workers, 8)
            warm = self.submit(f"warm-{workers}-{tag}", warm_chunks)
            self.wait_done(warm, 900)
            rate = warm_chunks / max(self._window(warm), 1e-3)  # chunks/s, first chunks included: low
            chunks = min(max(3 * workers, math.ceil(rate * self.args.seconds * 1.2)), self.args.max_chunks)
        name = f"measured-{workers}-{tag}"
        print(f"{workers} workers: measuring a run of {chunks} chunks ({chunks * self.args.chunk_size} examples)",
              file=sys.stderr, flush=True)
        result: dict[str, int] = {}
        thread = threading.Thread(target=lambda: result.setdefault("id", self.submit(name, chunks)), daemon=True)
        thread.start()
        run_id = self.wait_started(name)
        before = self._cpu()
        status = self.wait_done(run_id, 3600)
        after = self._cpu()
        thread.join()
        point = self._read(run_id, workers, status)
        point.cpu = {k: after[k] - before[k] for k in after}  # CPU seconds (and "wall": seconds) in the window
        point.rss_mib = sum(pss_mib(p.pid) for p in self.workers[:workers]) / workers
        return point

    def _window(self, run_id: int) -> float:
        """Seconds from a run's first claim to its end."""
        with self.engine.connect() as conn:
            first, finished = conn.execute(text(
                "SELECT (SELECT min(started_at) FROM chunks WHERE run_id = :r), finished_at FROM runs WHERE id = :r"),
                {"r": run_id}).one()
        return float((finished - first).total_seconds())

    def _cpu(self) -> dict[str, float]:
        workers = [p.pid for p in self.workers]
        pg = self.pg.pids() if self.pg is not None else _named("postgres")
        redis = [self.redis.proc.pid] if self.redis is not None and self.redis.proc else _named("redis-server")
        return {"wall": time.monotonic(), "machine": machine_cpu_seconds(), "workers": cpu_seconds(workers),
                "postgres": cpu_seconds(pg), "redis": cpu_seconds(redis)}

    def _read(self, run_id: int, workers: int, status: str) -> Point:
        with self.engine.connect() as conn:
            first, finished, n_chunks = conn.execute(text(
                "SELECT (SELECT min(started_at) FROM chunks WHERE run_id = :r), finished_at, n_chunks "
                "FROM runs WHERE id = :r"), {"r": run_id}).one()
            rows = conn.execute(text("SELECT count(*) FROM generations WHERE run_id = :r"), {"r": run_id}).scalar()
            retried = conn.execute(text("SELECT count(*) FROM chunks WHERE run_id = :r AND attempts > 1"),
                                   {"r": run_id}).scalar()
            ends = [r[0] for r in conn.execute(text(
                "SELECT finished_at FROM chunks WHERE run_id = :r AND status = 'done' ORDER BY finished_at"),
                {"r": run_id})]
            connections = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
                                       ).scalar()
        point = Point(workers, chunks=int(n_chunks), rows=int(rows or 0), retried=int(retried or 0), status=status,
                      pg_connections=int(connections or 0))
        point.window_s = (finished - first).total_seconds()
        lo, hi = len(ends) // 10, len(ends) - 1 - len(ends) // 10
        if hi > lo:
            span = (ends[hi] - ends[lo]).total_seconds()
            per_chunk = point.rows / max(point.chunks, 1)
            point.steady_chunks_min = 60 * (hi - lo) / span if span else 0.0
            point.steady_rows_s = (hi - lo) * per_chunk / span if span else 0.0
        self._phases(point, run_id, first.timestamp(), finished.timestamp())
        return point

    def _phases(self, point: Point, run_id: int, start: float, end: float) -> None:
        records = []
        for path in self.timings.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record["run"] == run_id:
                    records.append(record)
        if not records:
            return
        n = len(records)
        for suffix, target in (("", point.phases_ms), ("_cpu", point.phases_cpu_ms)):
            sums = {k: sum(r.get(k + suffix, 0.0) for r in records)
                    for k in ("total", "claim", "read", "lookup", "planner", "gen", "write")}
            target.update({
                "claim": 1000 * sums["claim"] / n,
                "other": 1000 * (sums["total"] - sums["claim"] - sums["read"] - sums["planner"] - sums["write"]) / n,
                "read": 1000 * sums["read"] / n,
                "lookup": 1000 * sums["lookup"] / n,
                "planner": 1000 * (sums["planner"] - sums["lookup"] - sums["gen"]) / n,
                "gen": 1000 * sums["gen"] / n,
                "write": 1000 * sums["write"] / n,
                "total": 1000 * sums["total"] / n,
            })
        sums = {"total": sum(r["total"] for r in records)}
        point.busy = sums["total"] / (point.workers * (end - start)) if end > start else 0.0


def _ready(log: Path, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise SystemExit(f"a simulated worker exited ({proc.returncode}); its log, {log}:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    return log.exists() and " ready." in log.read_text(errors="replace")


def print_table(points: list[Point], args: argparse.Namespace, shape: str) -> None:
    print(f"\ncontrol plane, {shape}; {os.cpu_count()} cores")
    print(f"{'workers':>7} {'chunks':>6} {'rows':>8} {'window s':>8} {'chunks/min':>10} {'rows/s':>8} "
          f"{'steady/min':>10} {'steady r/s':>10} {'retried':>7} {'status':>9}")
    for p in points:
        print(f"{p.workers:>7} {p.chunks:>6} {p.rows:>8} {p.window_s:>8.1f} {p.chunks_min:>10.0f} {p.rows_s:>8.0f} "
              f"{p.steady_chunks_min:>10.0f} {p.steady_rows_s:>10.0f} {p.retried:>7} {p.status:>9}")
    print("\nwhere the time goes: ms per chunk in each worker (wall; then the worker's CPU in it), and the share")
    print("of the workers' wall time spent in chunks (the rest: waiting for a message, Celery, the broker)")
    print(f"{'workers':>7} " + " ".join(f"{k:>8}" for k in (*PHASES, "total")) + f" {'busy':>6} {'idle':>6}")
    for p in points:
        for label, ms in (("wall", p.phases_ms), ("cpu", p.phases_cpu_ms)):
            line = f"{p.workers if label == 'wall' else '':>7} " + " ".join(f"{ms.get(k, 0.0):>8.1f}"
                                                                             for k in (*PHASES, "total"))
            line += f" {100 * p.busy:>5.0f}% {100 * (1 - p.busy):>5.0f}%" if label == "wall" else "  (CPU)"
            print(line)
    print("\nCPU over the window: share of the machine's cores, then CPU ms per chunk (capacity: the chunks/min")
    print("that CPU would allow on all cores of an otherwise idle machine); PSS memory per worker; PG connections")
    print(f"{'workers':>7} {'workers%':>8} {'postgres%':>9} {'redis%':>7} {'other%':>7} {'idle%':>6}   "
          f"{'cpu ms/chunk: workers':>21} {'postgres':>8} {'redis':>6} {'capacity/min':>12} {'PSS MiB':>8} "
          f"{'pg conns':>8}")
    cores = os.cpu_count() or 1
    for p in points:
        c, wall = p.cpu, max(p.cpu.get("wall", 0.0), 1e-9)
        share = {k: c.get(k, 0.0) / wall / cores for k in ("machine", "workers", "postgres", "redis")}
        other = share["machine"] - share["workers"] - share["postgres"] - share["redis"]
        per = {k: 1000 * c.get(k, 0.0) / max(p.chunks, 1) for k in ("workers", "postgres", "redis")}
        used = sum(per.values())
        capacity = 60_000 * cores / used if used else 0.0
        print(f"{p.workers:>7} {100 * share['workers']:>8.0f} {100 * share['postgres']:>9.0f} "
              f"{100 * share['redis']:>7.0f} {100 * other:>7.0f} {100 * (1 - share['machine']):>6.0f}   "
              f"{per['workers']:>21.1f} {per['postgres']:>8.1f} {per['redis']:>6.1f} {capacity:>12.0f} "
              f"{p.rss_mib:>8.0f} {p.pg_connections:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens: the fake outputs' longest")
    parser.add_argument("--seconds", type=float, default=40, help="about how long each measured run lasts")
    parser.add_argument("--max-chunks", type=int, default=3000)
    parser.add_argument("--pg", default="private", help="'private' (own server) or an admin URL of a server")
    parser.add_argument("--redis", default="private", help="'private' (own server) or a Redis URL")
    parser.add_argument("--tiny", action="store_true", help="a few seconds: 1 and 2 workers, small chunks")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, timings)")
    args = parser.parse_args()
    if args.tiny:
        args.workers, args.chunk_size, args.seconds, args.max_chunks = [1, 2], 16, 1.0, 8

    folder = Path(tempfile.mkdtemp(prefix="lc-cpbench-"))
    os.chmod(folder, 0o755)
    pg = redis = None
    database = f"lc_cpbench_{uuid.uuid4().hex[:8]}"
    admin_url = args.pg
    bench: Bench | None = None
    created = False
    try:
        if args.pg == "private":
            pg = PrivatePostgres(folder, max_connections=4 * max(args.workers) + 30).start()
            admin_url = pg.admin_url
        broker_url = args.redis
        if args.redis == "private":
            redis = PrivateRedis(folder).start()
            broker_url = redis.url
        admin = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{database}"'))
        created = True
        db_url = admin_url.rsplit("/", 1)[0] + f"/{database}"
        upgrade(make_engine(db_url))
        bench = Bench(args, folder, db_url, broker_url, pg, redis)
        points = []
        for workers in sorted(args.workers):
            missing = workers - len(bench.workers)
            measured = max((pss_mib(p.pid) for p in bench.workers), default=0.0)
            per_worker = measured * 1.2 + 20 if measured else WORKER_MIB  # + its database connections
            if missing > 0 and missing * per_worker > available_mib() - RESERVE_MIB:
                print(f"{workers} workers: skipped, {missing} more at about {per_worker:.0f} MiB each would not fit in "
                      f"the {available_mib():.0f} MiB available (keeping {RESERVE_MIB} MiB free)", file=sys.stderr)
                continue
            point = bench.measure(workers)
            points.append(point)
            print(f"{workers} workers: {point.chunks} chunks in {point.window_s:.1f} s, {point.chunks_min:.0f}/min, "
                  f"{point.rows_s:.0f} rows/s ({point.status})", file=sys.stderr, flush=True)
        shape = (f"chunk_size {args.chunk_size} x {args.adapters + 1} variants = "
                 f"{args.chunk_size * (args.adapters + 1)} rows per chunk, max_new_tokens {args.new_tokens}, "
                 f"PostgreSQL {'private' if pg else 'shared'}, Redis {'private' if redis else 'shared'}")
        print_table(points, args, shape)
        if any(p.status != "completed" for p in points):
            raise SystemExit("a measured run did not complete")
    finally:
        if bench is not None:
            bench.stop_workers()
            bench.engine.dispose()
        if pg is None and created:
            admin = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://"),
                                  isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            admin.dispose()
        try:
            if pg is not None:
                pg.stop()
        finally:
            if redis is not None:
                redis.stop()
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
