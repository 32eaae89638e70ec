"""A checkpoint's JSON metadata: its schema, checked as strictly as its arrays, and the
fingerprint of the model and data config it was trained with.

Written by the trainer; whatever reads it back (a resume, ``hvae_core.load``) gets either
metadata of this shape or one line of :class:`HvaeError`, never a KeyError from deep inside.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hvae_core.errors import HvaeError, PluginError

# Config sections a resumed run may change: how it trains and runs, never the model or data.
RESUMABLE_SECTIONS = ("training", "run", "lr_schedule", "beta_schedule", "regularizer", "tracker")


@dataclass(frozen=True)
class PluginUse:
    """One plugin a run used, as its checkpoint records it."""

    kind: str
    name: str
    package: str
    version: str


def plugins_used(config: Any, registry: Any = None) -> list[PluginUse]:
    """The plugins ``config`` selects (one per kind at most), with the installed package and
    version of each: what a run records so that whoever loads it knows what to install."""
    from hvae_core.config import SELECTOR
    from hvae_core.plugins import get_registry

    registry = registry or get_registry()
    used = []
    for kind in SELECTOR:
        name = config.selected(kind)
        if name is not None:
            spec = registry.get(kind, name)
            used.append(PluginUse(kind, name, spec.package, spec.version))
    return used


def check_plugins(recorded: Sequence[Mapping[str, str]], registry: Any = None) -> list[str]:
    """Raise a :class:`PluginError` naming the package to install when a plugin the run used
    is not installed; return one warning per plugin now installed at another version."""
    from hvae_core.plugins import get_registry

    registry = registry or get_registry()
    warnings = []
    for row in recorded:
        use = PluginUse(**{k: str(row[k]) for k in ("kind", "name", "package", "version")})
        if use.name not in registry.names(use.kind):
            raise PluginError(
                f"this run used the {use.kind} plugin '{use.name}' from the package "
                f"{use.package} {use.version}, which is not installed",
                hint=f"pip install '{use.package}=={use.version}'",
            )
        spec = registry.get(use.kind, use.name)
        if spec.package != use.package or spec.version != use.version:
            warnings.append(
                f"the run used {use.kind} '{use.name}' from {use.package} {use.version}; "
                f"installed is {spec.package} {spec.version}"
            )
    return warnings


Check = Callable[[Any], bool]


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return _integer(value) and value >= 0


def _positive(value: Any) -> bool:
    return _integer(value) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _sums(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _number(v) for k, v in value.items()
    )


def _shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_positive(v) for v in value)


def _plugins(value: Any) -> bool:
    keys = {"kind", "name", "package", "version"}
    return isinstance(value, list) and all(
        isinstance(row, dict) and set(row) == keys and all(map(_text, row.values()))
        for row in value
    )


def _sections(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, dict) for k, v in value.items()
    )


# field: (check, what it must be, required). Fields that older hvae versions did not write
# are optional.
POSITION: dict[str, tuple[Check, str, bool]] = {
    "epoch": (_count, "an integer >= 0", True),
    "batch": (_count, "an integer >= 0", True),
    "step": (_count, "an integer >= 0", True),
    "consecutive_skips": (_count, "an integer >= 0", True),
    "best_val": (lambda v: v is None or _number(v), "a number or null", True),
    "bad_epochs": (_count, "an integer >= 0", True),
    "epoch_seconds": (lambda v: _number(v) and v >= 0, "a number >= 0", True),
    "sums": (_sums, "an object of numbers", True),
}
META: dict[str, tuple[Check, str, bool]] = {
    "position": (lambda v: isinstance(v, dict), "an object", True),
    "num_bits": (lambda v: _integer(v) and 1 <= v <= 16, "an integer in 1..16", True),
    "image_shape": (_shape, "a list of 3 positive integers", True),
    "hvae_version": (_text, "a string", False),
    "plugins": (_plugins, "a list of {kind, name, package, version} strings", False),
    "fingerprint": (_text, "a string", False),
    "fingerprint_config": (_sections, "an object of config sections", False),
    # Where the weights came from when hvae did not train them (``hvae import``).
    "provenance": (
        lambda v: isinstance(v, dict) and all(map(_text, v.values())),
        "an object of strings",
        False,
    ),
}


def invalid(path: Path, problem: str) -> HvaeError:
    return HvaeError(
        f"checkpoint {path} has invalid metadata: {problem}",
        hint="it was not written by 'hvae train' or was edited; resume from an intact copy or "
        "start a new run",
    )


def _check_fields(
    values: Mapping[str, Any], schema: Mapping[str, tuple[Check, str, bool]], where: str, path: Path
) -> None:
    extra = sorted(set(values) - set(schema))
    if extra:
        raise invalid(path, f"unknown field {where}{extra[0]}")
    for name, (check, what, required) in schema.items():
        if name not in values:
            if required:
                raise invalid(path, f"no field {where}{name}")
            continue
        if not check(values[name]):
            raise invalid(path, f"{where}{name} must be {what}, got {_short(values[name])}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(meta: Any, path: Path) -> dict[str, Any]:
    """``meta`` when it has the schema above, else one line of :class:`HvaeError` (where the
    position lies in an epoch is checked on restore, by :func:`check_position`)."""
    if not isinstance(meta, dict):
        raise invalid(path, f"expected a JSON object, got {type(meta).__name__}")
    _check_fields(meta, META, "", path)
    _check_fields(meta["position"], POSITION, "position.", path)
    return meta


def check_position(meta: Mapping[str, Any], path: Path, batches_per_epoch: int) -> None:
    """One line when validated metadata ``meta`` stands past the end of an epoch of
    ``batches_per_epoch`` batches (the run's epoch length now)."""
    batch = meta["position"]["batch"]
    if batch > batches_per_epoch:
        raise HvaeError(
            f"checkpoint {path} stands at batch {batch} of an epoch, which now has "
            f"{batches_per_epoch} batches",
            hint="resume with the training.batch_size the run was trained with",
        )


def parse(text: str | None, path: Path) -> dict[str, Any]:
    """The metadata in ``text`` (the checkpoint's ``hvae`` JSON entry), validated."""
    if text is None:
        raise invalid(path, "no hvae entry")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        raise invalid(path, "not JSON") from None
    return validate(meta, path)


# -- the fingerprint of what a resume must not change ---------------------------------------


def metadata(
    position: Mapping[str, Any],
    num_bits: int,
    image_shape: Sequence[int],
    plugins: Sequence[PluginUse],
    config: Any,
) -> dict[str, Any]:
    """What a checkpoint records beside its arrays (the schema above): where the run stands,
    the data's shape and bit depth, the hvae version, the plugins used, the fingerprint."""
    from hvae_core import __version__

    return {
        "position": dict(position),
        "num_bits": int(num_bits),
        "image_shape": [int(n) for n in image_shape],
        "hvae_version": __version__,
        "plugins": [asdict(use) for use in plugins],
        **fingerprint_fields(config),
    }


def fingerprinted_sections(config: Any) -> dict[str, Any]:
    """The config sections that make the model and its data (all but
    :data:`~hvae_core.run.RESUMABLE_SECTIONS`), in their JSON form."""
    sections = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_SECTIONS}
    return json.loads(json.dumps(sections, sort_keys=True))


def fingerprint(sections: Mapping[str, Any]) -> str:
    canonical = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint_fields(config: Any) -> dict[str, Any]:
    """What a checkpoint records of ``config``: the fingerprint and the sections it hashes
    (so that a mismatch can name the keys)."""
    sections = fingerprinted_sections(config)
    return {"fingerprint": fingerprint(sections), "fingerprint_config": sections}


def differences(meta: Mapping[str, Any], config: Any) -> list[str]:
    """The dotted keys of the model and data config in which ``config`` differs from the one
    the checkpoint was trained with; empty when they agree or the checkpoint predates
    fingerprints. Options only ``config`` has (added by a later hvae, at their default)
    do not count."""
    if "fingerprint" not in meta:
        return []
    sections = fingerprinted_sections(config)
    if fingerprint(sections) == meta["fingerprint"]:
        return []
    stored = meta.get("fingerprint_config")
    if not isinstance(stored, dict):
        return ["(the fingerprint; the checkpoint does not say which keys)"]
    return model_and_data_changes(stored, sections)


def model_and_data_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The one rule for "the same model and data?": the dotted keys of the fingerprinted
    sections (see :func:`fingerprinted_sections`) whose value in ``old`` differs in ``new``.
    Options only ``new`` has (added by a later hvae, at their default) do not count."""
    changed = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name) or {}, new.get(name) or {}
        changed += [f"{name}.{k}" for k in sorted(before) if before[k] != after.get(k, _ABSENT)]
    return changed


_ABSENT = object()


def refuse_other_config(meta: Mapping[str, Any], config: Any, path: Path) -> None:
    """One line when ``config`` would train another model or data than the checkpoint's
    (a config.yaml edited in a way that keeps every weight's shape, say)."""
    changed = differences(meta, config)
    if changed:
        raise HvaeError(
            f"checkpoint {path} was trained with another model or data config "
            f"(differs in {', '.join(changed[:5])})",
            hint="undo the change to the run's config.yaml, or start a new run",
        )
