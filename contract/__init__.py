"""What the producer and the worker agree on, and nothing else of ours: errors, settings and defaults,
the run config, the queue message, the scoring rules and artifact identity. Imports neither torch nor
any other package of this project, so both sides (and any tool) can depend on it."""
