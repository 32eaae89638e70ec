"""Plugin manager: loads the ``hvae`` entry points through pluggy and keeps the registry.

The core's built-ins register through the same hooks as every installed package. Loading a
plugin package must stay light (no Keras, no backend): implementations are named as
``"module:attribute"`` and imported only by :meth:`PluginSpec.load`, when they are used.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import re
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pluggy

from hvae_core import hookspecs
from hvae_core.errors import DEBUG_ENV, HvaeError, PluginError
from hvae_core.options import NoOptions, check_options_class, clipped

ENTRY_POINT_GROUP = "hvae"
ALLOW_ENV = "HVAE_LOAD_PLUGINS"
CORE_PACKAGE = "hvae"
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class PluginSpec:
    """One registered plugin: what ``hvae plugins list`` shows and how to get at it."""

    kind: str
    name: str
    target: Any
    options: type
    summary: str
    package: str
    version: str
    info: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        """How errors name this plugin: kind, name and the package that provides it."""
        return f"{self.kind} '{self.name}' from package {self.package}"

    def load(self) -> Any:
        """The implementation object, importing its module now if it was named by reference."""
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except HvaeError:
            raise  # the plugin's own one line for the user (e.g. which package to install)
        except Exception as exc:
            raise PluginError(
                f"{self.label()} failed to load {self.target}: {type(exc).__name__}: {exc}",
                hint=f"reinstall or fix the package {self.package}",
            ) from exc
        return obj

    def create(self, *args: Any, **kwargs: Any) -> Any:
        """Call the implementation (a factory, see :mod:`hvae_core.interfaces`) with ``args``;
        what it raises is reported as :meth:`reported` says."""
        factory = self.load()
        with self.reported():
            return factory(*args, **kwargs)

    @contextmanager
    def reported(self, what: str = "") -> Iterator[None]:
        """Run this plugin's code (its factory; with ``what``, e.g. "options", that part of
        it): whatever it raises becomes one :class:`PluginError` naming the plugin and its
        package, with the original exception as its ``__cause__`` (``hvae --debug`` prints
        it). An :class:`HvaeError` the plugin raises on purpose keeps its own message."""
        try:
            yield
        except HvaeError:
            raise
        except Exception as exc:
            part = f" ({what})" if what else ""
            raise PluginError(
                f"{self.label()}{part} failed: {type(exc).__name__}: {exc}",
                hint=f"a problem in the package {self.package} or in the options given to it; "
                f"'hvae --debug ...' (or {DEBUG_ENV}=1) shows the traceback",
            ) from exc

    def as_row(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "summary": self.summary,
        }


@dataclass(frozen=True)
class PluginFailure:
    """A plugin package that could not be loaded or whose registration raised."""

    package: str
    entry_point: str
    error: str
    version: str = "unknown"
    kind: str | None = None  # known when one of its hooks failed

    def one_line(self) -> str:
        return (
            f"plugin package {self.package} (entry point {self.entry_point}) failed: {self.error}"
        )

    def as_row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": None,
            "package": self.package,
            "version": self.version,
            "summary": "",
            "entry_point": self.entry_point,
            "error": self.error,
        }


class PluginRegistry:
    """Every registered plugin by (kind, name), plus what went wrong while loading them: the
    packages that failed, the names that two packages register (a clash is an error only when
    that name is used) and the warnings about the allow-list."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], PluginSpec] = {}
        self._clashes: dict[tuple[str, str], list[PluginSpec]] = {}
        self.failures: list[PluginFailure] = []
        self.warnings: list[str] = []
        # (package, version, entry point, register_commands implementation) per plugin package.
        self.command_hooks: list[tuple[str, str, str, Any]] = []
        self._commands: dict[str, Any] | None = None

    @property
    def commands_added(self) -> bool:
        """Whether :meth:`commands` has called the plugins' ``register_commands`` hooks."""
        return self._commands is not None

    def commands(self, reserved: Collection[str]) -> dict[str, Any]:
        """The ``hvae`` subcommands the plugin packages add (their ``register_commands``
        hooks, called once), by name; a name in ``reserved`` (hvae's own commands) or added
        twice is left out with a warning."""
        if self._commands is not None:
            return self._commands
        import click

        commands: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for package, version, ep_name, hook in self.command_hooks:
            group = click.Group()
            try:
                hook(cli=group)
            except Exception as exc:
                self.failures.append(
                    PluginFailure(
                        package,
                        ep_name,
                        f"register_commands: {type(exc).__name__}: {exc}",
                        version,
                    )
                )
                continue
            for name, command in group.commands.items():
                if name in reserved or name in commands:
                    holder = "hvae" if name in reserved else owners[name]
                    self.warnings.append(
                        f"the command '{name}' of {package} is ignored: {holder} has one of "
                        "that name"
                    )
                    continue
                commands[name], owners[name] = command, package
        self._commands = commands
        return commands

    def add(self, spec: PluginSpec) -> None:
        """Register ``spec``; a (kind, name) that is already registered becomes a clash."""
        key = (spec.kind, spec.name)
        if key in self._clashes:
            self._clashes[key].append(spec)
        elif key in self._specs:
            self._clashes[key] = [self._specs[key], spec]
        else:
            self._specs[key] = spec

    def remove(self, kind: str, name: str) -> None:
        self._specs.pop((kind, name), None)
        self._clashes.pop((kind, name), None)

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self._specs

    def clash(self, kind: str, name: str) -> list[PluginSpec]:
        """Every registration of ``kind`` ``name`` when two or more packages register it."""
        return list(self._clashes.get((kind, name), []))

    def clash_message(self, kind: str, name: str) -> str:
        specs = self._clashes[(kind, name)]
        packages = " and ".join(f"{s.package} {s.version}" for s in specs)
        return f"{kind} '{name}' is registered by {len(specs)} packages: {packages}"

    def get(self, kind: str, name: str) -> PluginSpec:
        _check_kind(kind)
        if (kind, name) in self._clashes:
            raise PluginError(
                self.clash_message(kind, name),
                hint="uninstall one of them, or allow only one with HVAE_LOAD_PLUGINS",
            )
        try:
            return self._specs[(kind, name)]
        except KeyError:
            pass
        names = self.names(kind)
        hint = (
            f"installed {kind} plugins: {', '.join(names)}"
            if names
            else (f"no {kind} plugin is installed")
        )
        if self.failures:
            hint += "; some plugin packages failed to load: " + "; ".join(
                f.one_line() for f in self.failures
            )
        if self.warnings:
            hint += "; " + "; ".join(self.warnings)
        raise PluginError(
            f"unknown {kind} '{clipped(str(name))}'", hint=hint + " (see 'hvae plugins list')"
        )

    def names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self._specs if k == kind)

    def all(self, kind: str | None = None) -> list[PluginSpec]:
        """The usable plugins (a clashing name is not one), by kind then name."""
        if kind is not None:
            _check_kind(kind)
        specs = [
            s
            for key, s in self._specs.items()
            if (kind is None or s.kind == kind) and key not in self._clashes
        ]
        return sorted(specs, key=_order)

    def problems(self) -> list[str]:
        """One line for each failed package, each clash and each allow-list warning."""
        clashes = [self.clash_message(kind, name) for kind, name in sorted(self._clashes)]
        return [f.one_line() for f in self.failures] + clashes + self.warnings

    def rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        """What ``hvae plugins list --json`` prints: one row per registration, clashing ones
        included, then one per failed package; a row that is not usable has an ``error``."""
        if kind is not None:
            _check_kind(kind)
        rows: list[tuple[PluginSpec, dict[str, Any]]] = [(s, s.as_row()) for s in self.all(kind)]
        for (k, name), specs in self._clashes.items():
            if kind is None or k == kind:
                error = self.clash_message(k, name)
                rows += [(s, s.as_row() | {"error": error}) for s in specs]
        rows.sort(key=lambda pair: _order(pair[0]))
        failed = [f.as_row() for f in self.failures if kind is None or f.kind in (None, kind)]
        return [row for _, row in rows] + failed


def _order(spec: PluginSpec) -> tuple[int, str]:
    return hookspecs.KINDS.index(spec.kind), spec.name


def _check_kind(kind: str) -> None:
    if kind not in hookspecs.HOOK_FOR_KIND:
        raise PluginError(
            f"unknown plugin kind '{kind}'", hint=f"kinds are: {', '.join(hookspecs.KINDS)}"
        )


def make_spec(
    kind: str,
    name: str,
    target: Any,
    options: type | None,
    summary: str,
    package: str,
    version: str,
    info: Mapping[str, Any],
) -> PluginSpec:
    """Validate one registration; raises TypeError/ValueError on a malformed one."""
    _check_kind(kind)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r} is not kebab-case (e.g. 'conv-sylvester')")
    if isinstance(target, str):
        if not re.match(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$", target):
            raise ValueError(f"{kind} '{name}': target {target!r} is not 'module:attribute'")
    elif not callable(target):
        raise TypeError(f"{kind} '{name}': target must be 'module:attribute' or a callable")
    options = NoOptions if options is None else options
    check_options_class(options)
    if not isinstance(summary, str) or "\n" in summary.strip():
        raise ValueError(f"{kind} '{name}': summary must be one line of text")
    return PluginSpec(
        kind=kind,
        name=name,
        target=target,
        options=options,
        summary=summary.strip(),
        package=package,
        version=version,
        info=MappingProxyType(dict(info)),
    )


def _allow_list() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _core_version() -> str:
    try:
        return metadata.version(CORE_PACKAGE)
    except metadata.PackageNotFoundError:
        from hvae_core import __version__

        return __version__


def load_registry(allow: set[str] | None = None) -> PluginRegistry:
    """Build a registry from the core built-ins and the ``hvae`` entry points.

    ``allow`` (default: the ``HVAE_LOAD_PLUGINS`` comma-separated list, when set) restricts the
    entry points loaded to those whose entry-point name or distribution name it contains.
    """
    from hvae_core import core_plugins

    if allow is None:
        allow = _allow_list()
    registry = PluginRegistry()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    sources: dict[int, tuple[str, str, str]] = {}

    def add_source(module: Any, package: str, version: str, ep_name: str) -> None:
        if pm.is_registered(module):
            return
        try:
            pm.register(module, name=f"{package}:{ep_name}")
        except Exception as exc:  # pluggy validation: a hook's signature does not match
            registry.failures.append(
                PluginFailure(package, ep_name, f"{type(exc).__name__}: {exc}", version)
            )
            return
        unknown = sorted(c.name for c in pm.get_hookcallers(module) or [] if c.spec is None)
        if unknown:
            pm.unregister(module)
            registry.failures.append(
                PluginFailure(
                    package,
                    ep_name,
                    f"implements unknown hooks {', '.join(unknown)} "
                    f"(hooks are: {', '.join(hookspecs.HOOKS)})",
                    version,
                )
            )
            return
        sources[id(module)] = (package, version, ep_name)

    add_source(core_plugins, CORE_PACKAGE, _core_version(), "core")
    installed: dict[str, list[str]] = {}  # distribution -> its entry points in the group
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        package = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        installed.setdefault(package, []).append(ep.name)
        if allow is not None and ep.name not in allow and package not in allow:
            continue
        try:
            module = ep.load()
        except Exception as exc:
            registry.failures.append(
                PluginFailure(package, ep.name, f"{type(exc).__name__}: {exc}", version)
            )
            continue
        add_source(module, package, version, ep.name)
    if allow is not None:
        known = set(installed).union(*installed.values())
        for name in sorted(allow - known):
            packages = ", ".join(f"{p} ({', '.join(eps)})" for p, eps in sorted(installed.items()))
            registry.warnings.append(
                f"{ALLOW_ENV} names '{name}', which is neither an installed plugin package nor "
                f"one of its entry points (installed: {packages or 'none'})"
            )

    for kind, hook_name in hookspecs.HOOK_FOR_KIND.items():
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
            package, version, ep_name = sources[id(impl.plugin)]

            def register(
                name: str,
                target: Any,
                *,
                options: type | None = None,
                summary: str = "",
                _kind: str = kind,
                _package: str = package,
                _version: str = version,
                **info: Any,
            ) -> None:
                spec = make_spec(_kind, name, target, options, summary, _package, _version, info)
                registry.add(spec)

            try:
                impl.function(register)
            except Exception as exc:
                registry.failures.append(
                    PluginFailure(
                        package,
                        ep_name,
                        f"{hook_name}: {type(exc).__name__}: {exc}",
                        version,
                        kind,
                    )
                )
    for impl in reversed(pm.hook.register_commands.get_hookimpls()):
        package, version, ep_name = sources[id(impl.plugin)]
        registry.command_hooks.append((package, version, ep_name, impl.function))
    return registry


_registry: PluginRegistry | None = None
_lock = threading.Lock()


def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = load_registry()
        return _registry


def reset_registry() -> None:
    """Forget the loaded registry (tests, or after installing a package in-process)."""
    global _registry
    with _lock:
        _registry = None
