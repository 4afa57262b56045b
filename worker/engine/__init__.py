"""The decode engine: base and adapter rows generated on one resident copy of the weights.

- `generation`: the entry points the chunk code calls (`generate_mixed`, `generate_separate`,
  `eos_ids`, `finish`);
- `scheduler`: `decode_rows`, the loop that streams rows through one batch (refill, finished rows
  leave); `batch`: the rows in flight; `call`: `DecodeOptions` and the state of one call;
- `kv_cache`: the KV cache written in place; `prefix`: the shared prompt prefix;
- `sampling`: argmax or temperature + top-p; `request`: what a call generates and where rows end;
- `lora_routing`: mixed-adapter batches without PEFT's per-layer bookkeeping; `cpu_head`: the
  output projection on a multiple of 8 rows on CPU; `cpu_linear`: float32 linear layers through
  oneDNN on CPU; `attention`: a decode step's attention over the prefix and own columns in place,
  `cpu_attention` its C kernel on CPU (`cpu_cache`: the machine's last-level cache, which sizes the
  kernel build's timing); `contention`: one thread while other work has the cores;
- `fidelity`: which fast paths a call may take, and the exact fallbacks; `plain`: one prompt at a
  time with plain transformers + PEFT, the reference;
- `steps`: an opt-in record of the loop's steps, for benchmarks;
- `compat`: the transformers range the KV cache is built for, checked here at import.
"""

from __future__ import annotations

import warnings

from .compat import check_transformers

check_transformers()
# transformers 5.x warns at every forward pass that `past_key_values` is renamed `cache` (before 5.40);
# the supported range above still needs the old name, so the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
