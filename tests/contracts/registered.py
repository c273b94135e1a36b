"""Every registered name of each kind, for the contract suites' parametrisation.

The shared registry (`rankwise.registry.registry(kind).names()`) is the source once a kind is
migrated onto it; until then each kind's own public listing is. Both give the same names, so
the contract suites hold before, during and after the migration.
"""

from __future__ import annotations

from collections.abc import Callable


def _from_registry(kind: str) -> list[str]:
    try:
        from rankwise.registry import registry
    except ImportError:  # pragma: no cover - the registry module predates this suite
        return []
    return list(registry(kind).names())


def names(kind: str, fallback: Callable[[], list[str]]) -> list[str]:
    """Sorted names of `kind`: the shared registry's when populated, else `fallback()`'s."""
    found = _from_registry(kind) or list(fallback())
    if not found:
        raise RuntimeError(f"no {kind} is registered: the contract suite would test nothing")
    return sorted(found)


def adapters() -> list[str]:
    from rankwise import adapt

    return names("adapter", adapt.list_methods)


def optimizers() -> list[str]:
    import rankwise.optim as ro

    return names("optimizer", lambda: list(ro.PRESETS))


def compressors() -> list[str]:
    from rankwise.compress import presets

    return names("compressor", presets.method_names)


def layers() -> list[str]:
    from rankwise import layers as rl

    return names("layer", lambda: list(rl.LAYER_METHODS))
