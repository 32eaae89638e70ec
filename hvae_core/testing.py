"""Helpers for tests, of hvae and of plugin packages: nothing in hvae itself calls them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hvae_core.errors import PluginError
from hvae_core.plugins import PluginRegistry, PluginSpec, make_spec


@contextmanager
def temporary_plugin(
    registry: PluginRegistry,
    kind: str,
    name: str,
    target: Any,
    *,
    options: type | None = None,
    summary: str = "",
    package: str = "tests",
    version: str = "0",
    **info: Any,
) -> Iterator[PluginSpec]:
    """A throw-away plugin in ``registry`` for the duration of a ``with`` block, registered
    as a package's ``register`` call would register it."""
    if registry.has(kind, name):
        raise PluginError(f"{kind} '{name}' is already registered")
    spec = make_spec(kind, name, target, options, summary, package, version, info)
    registry.add(spec)
    try:
        yield spec
    finally:
        registry.remove(kind, name)
