"""Distributed mode's overhead on a warm worker: submit-to-first-row latency and the share of a
run's time spent outside generation (queue, database, tokenization, scoring).

Starts one real `lora-compare worker` against Redis and PostgreSQL, warms it with one run, then
submits the measured run and reads the chunk timings back from SQL. Prints figures, not a verdict.

    .venv/bin/python bench/queue_overhead.py [--examples 40] [--chunk-size 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from db.engine import make_engine  # noqa: E402

LORA = [sys.executable, "-c", "from producer.cli import main; main()"]
CONFIG = """
name: {name}
model:
  base: demo
  adapters:
    arith: {adapter}
dataset:
  path: {data}
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
  limit: {limit}
generation:
  max_new_tokens: 16
  stop: ["\\n"]
inference:
  batch_size: 16
  chunk_size: {chunk_size}
scoring:
  match: numeric
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/4")
    args = parser.parse_args()

    database = f"lc_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.pg.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    db_url = args.pg.rsplit("/", 1)[0] + "/" + database
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="lc-bench-"))
    common = ["--database-url", db_url, "--broker-url", args.redis]
    log = (workdir / "worker.log").open("wb")
    worker = subprocess.Popen([*LORA, *common, "worker", "--device", args.device, "--queues", queue,
                               "--hostname", "bench@%h"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def submit(name: str, limit: int) -> tuple[int, float]:
            config = workdir / f"{name}.yaml"
            config.write_text(CONFIG.format(name=name, adapter=REPO / "examples/adapters/arith",
                                            data=REPO / "examples/arith.jsonl", limit=limit,
                                            chunk_size=args.chunk_size))
            started = time.perf_counter()
            out = subprocess.run([*LORA, *common, "submit", str(config), "--queue", queue], capture_output=True,
                                 text=True, check=True)
            return int(out.stdout.strip().splitlines()[-1]), started

        engine = make_engine(db_url)

        def wait_done(run_id: int, started: float) -> tuple[float, float]:
            first = None
            while True:
                with engine.connect() as conn:
                    rows = conn.execute(text("SELECT count(*) FROM generations WHERE run_id = :r"),
                                        {"r": run_id}).scalar_one()
                    status = conn.execute(text("SELECT status FROM runs WHERE id = :r"), {"r": run_id}).scalar_one()
                if rows and first is None:
                    first = time.perf_counter() - started
                if status in ("completed", "failed"):
                    assert status == "completed", status
                    return first or 0.0, time.perf_counter() - started
                time.sleep(0.01)

        warm_id, started = submit("warm-up", args.chunk_size)
        cold_first, _ = wait_done(warm_id, started)
        run_id, started = submit("measured", args.examples)
        first_row, wall = wait_done(run_id, started)
        with engine.connect() as conn:
            chunks = conn.execute(text(
                "SELECT id, queued_at, started_at, finished_at, generate_seconds FROM chunks WHERE run_id = :r "
                "ORDER BY id"), {"r": run_id}).all()
            run = conn.execute(text("SELECT created_at, finished_at FROM runs WHERE id = :r"), {"r": run_id}).one()
        generation = sum(c.generate_seconds for c in chunks)
        in_worker = sum((c.finished_at - c.started_at).total_seconds() for c in chunks)
        run_span = (run.finished_at - run.created_at).total_seconds()
        print(f"worker: {args.device}; {args.examples} examples x 2 variants in {len(chunks)} chunks of "
              f"{args.chunk_size}")
        print(f"cold worker, submit -> first output row: {cold_first:.2f} s (includes loading the model)")
        pickup = (chunks[0].started_at - run.created_at).total_seconds()
        print(f"warm worker, run recorded -> first chunk claimed by the worker: {pickup * 1000:.0f} ms")
        print(f"warm worker, submit -> first output row: {first_row:.2f} s (one chunk of generation included)")
        print(f"warm worker, submit -> run completed:    {wall:.2f} s")
        print(f"generation (sum over chunks):            {generation:.2f} s")
        print(f"worker time per chunk outside generation (claim, tokenize, score, write): "
              f"{(in_worker - generation) / len(chunks) * 1000:.0f} ms "
              f"= {(in_worker - generation) / in_worker:.1%} of the chunks' time")
        print(f"queue + database + everything but generation, share of the run (created -> finished): "
              f"{(run_span - generation) / run_span:.1%}")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
