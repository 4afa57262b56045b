"""The worker's OpenMP wait policy (`worker.threads`) is in the environment before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

from worker import threads

#: A child that records GOMP_SPINCOUNT as torch starts to import, then starts a worker's imports.
PROBE = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "seen" not in globals():
            globals()["seen"] = os.environ.get("GOMP_SPINCOUNT")
        return None
sys.meta_path.insert(0, Watch())
import producer.cli.embedded, worker.app, worker.tasks, worker.engine.scheduler
print(globals().get("seen"))
"""


def test_the_worker_sets_a_short_spin_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == threads.SPINCOUNT


def test_a_users_own_wait_policy_wins() -> None:
    for own in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "PASSIVE"}):
        env = dict(own)
        threads.apply(env)
        assert env == own
    env = {}
    threads.apply(env)
    assert env == {"GOMP_SPINCOUNT": threads.SPINCOUNT}
