"""Small helpers over JAX pytree paths."""

from __future__ import annotations


def path_names(path) -> list[str]:
    """The names along a pytree key path (dict keys, attribute names, sequence indices) as strings."""
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
