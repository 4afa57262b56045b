"""The transformers releases the engine runs on, checked when `worker.engine` is imported.

The KV cache (`kv_cache.RowsLayer`) subclasses transformers' `DynamicLayer` and fills a
`DynamicCache`'s `layers` / `layer_class_to_replicate` itself: that layered cache first shipped in
transformers 4.56. Every forward pass hands it over as `past_key_values`, the name transformers 5.x
deprecates for `cache` and removes in 5.40 (older releases know only `past_key_values`). Outside this
range the engine would fail in the middle of a chunk, or silently build the wrong cache; it refuses to
load instead. The same range is pinned in pyproject.toml.
"""

from __future__ import annotations

#: The transformers versions the engine supports: at least MINIMUM, below LIMIT.
MINIMUM, LIMIT = "4.56", "5.40"


class UnsupportedTransformersError(ImportError):
    """The installed transformers is outside the range the decode engine's KV cache is built for."""


def check_transformers(version: str | None = None) -> None:
    """Raise `UnsupportedTransformersError` unless `version` (default: the installed transformers')
    is in [MINIMUM, LIMIT)."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        import transformers

        version = str(transformers.__version__)
    try:
        parsed = Version(version)
    except InvalidVersion as err:
        raise UnsupportedTransformersError(f"transformers {version!r} is not a version the decode engine can check; "
                                           f"supported: >={MINIMUM},<{LIMIT}") from err
    # A pre-release or dev build of LIMIT (5.40.0.dev0) already lacks `past_key_values`: compare releases.
    if not Version(MINIMUM) <= Version(parsed.base_version) < Version(LIMIT):
        raise UnsupportedTransformersError(
            f"transformers {version} is installed; the decode engine (worker.engine) supports >={MINIMUM},<{LIMIT} "
            f"(its KV cache relies on DynamicLayer and the `past_key_values` argument): "
            f"pip install 'transformers>={MINIMUM},<{LIMIT}'")
