"""The last-level cache of the CPUs this process may run on, as Linux's sysfs gives it.

`cpu_attention` sizes the case it times its kernel's build variants on from it: a case that fits in
the cache times reads from cache, while a long decode step reads its keys and values from memory.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSFS = Path("/sys/devices/system/cpu")


def size(text: str) -> int:
    """A sysfs cache size ("32768K", "1M", "512") in bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def last_level(root: Path = SYSFS) -> int | None:
    """Bytes of the highest-level cache the CPUs this process may run on share: the sum over its
    instances (one per group of CPUs in `shared_cpu_list`) that hold any of them; None where sysfs does
    not say."""
    try:
        cpus: set[int] | None = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = None
    instances: dict[tuple[int, str], int] = {}  # (level, shared_cpu_list) -> size
    for index in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if cpus is not None and int(index.parent.parent.name[3:]) not in cpus:
                continue
            if (index / "type").read_text().strip() not in ("Unified", "Data"):
                continue
            level = int((index / "level").read_text())
            instances[(level, (index / "shared_cpu_list").read_text().strip())] = size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    if not instances:
        return None
    top = max(level for level, _ in instances)
    return sum(bytes_ for (level, _), bytes_ in instances.items() if level == top) or None
