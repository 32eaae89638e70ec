"""Checkpoints written before hvae stacked repeated blocks: one set of weights per block.

Such a checkpoint lists the model's weights, their EMA and the optimizer's slots block by block,
in the order of the unstacked model. :func:`from_unstacked` rebuilds that model beside the
stacked one (same config, same seed), reads the checkpoint into its structure, and stacks every
run's blocks row by row, so an old run resumes exactly where it was: same weights, same EMA,
same Adam moments.

Checkpoints written before the latent noise became an input also hold the states of the noise
streams the model kept (Keras ``SeedGenerator``s, one per latent layer, stacked in runs of
blocks, and the pixel sampler's): :func:`without_noise_seeds` drops them.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from hvae_core.model.repeat import RepeatedLayers


def runs_of(model: Any) -> list[RepeatedLayers]:
    """Every run of repeated blocks in ``model``."""
    runs = [layer for group in model.encoder.before for layer in group]
    runs += list(model.decoder.runs.values())
    return [run for run in runs if isinstance(run, RepeatedLayers)]


def _relative(path: str) -> str:
    """A variable's path below the model (models are numbered by name: hvae, hvae_1, ...)."""
    return path.split("/", 1)[1] if "/" in path else path


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [arrays[k] for k in sorted(k for k in arrays if k.startswith(prefix + "/"))]


def _sources(model: Any, legacy: Any) -> dict[int, tuple[list[Any], bool]]:
    """For each variable of ``model`` (by id): the legacy variables it is made of, and whether
    they are stacked (one row per legacy variable) or it is a single one."""
    sources: dict[int, tuple[list[Any], bool]] = {}
    encoder_blocks = [b for stage in legacy.encoder.stages for b in stage]
    legacy_layers = {layer.name: layer for layer in [*encoder_blocks, *legacy.decoder.blocks]}
    in_runs = set()
    for run in runs_of(model):
        members = [legacy_layers[m.name] for m in run.members]
        in_runs.update(id(m) for m in run.members)
        for variable, position in run.stacked_variables():
            sources[id(variable)] = ([m.variables[position] for m in members], True)
    # Blocks on their own, layer by layer (their noise seeds' paths do not name the block).
    blocks = [b for stage in model.encoder.stages for b in stage] + model.decoder.blocks
    for block in blocks:
        if id(block) not in in_runs:
            pairs = zip(block.variables, legacy_layers[block.name].variables, strict=True)
            sources.update((id(v), ([old], False)) for v, old in pairs)
    by_path = {_relative(v.path): v for v in legacy.variables}
    for variable in model.variables:
        if id(variable) not in sources:
            sources[id(variable)] = ([by_path[_relative(variable.path)]], False)
    return sources


def _assemble(values: list[np.ndarray], stacked: bool) -> np.ndarray:
    return np.stack(values) if stacked else values[0]


def from_unstacked(
    arrays: dict[str, np.ndarray], model: Any, optimizer: Any, ema: bool
) -> dict[str, np.ndarray]:
    """``arrays`` of a checkpoint in the unstacked layout, rewritten for ``model``'s (stacked)
    variables, its EMA (when ``ema``) and ``optimizer``'s variables (none when ``optimizer`` is
    None: a model loaded for inference). A ValueError says what does not fit."""
    from hvae_core.model.hvae import HVAE

    legacy = HVAE(
        model.config, model.image_shape, model.num_bits, seed=model.seed, stack_blocks=False
    )
    legacy.build_weights()
    saved = _prefixed(arrays, "model")
    if len(saved) != len(legacy.variables):
        raise ValueError(
            f"checkpoint holds {len(saved)} model arrays; this model has "
            f"{len(model.variables)} (or {len(legacy.variables)} unstacked)"
        )
    value = {id(v): a for v, a in zip(legacy.variables, saved, strict=True)}
    sources = _sources(model, legacy)
    out: dict[str, np.ndarray] = {}
    for i, v in enumerate(model.variables):
        parts, stacked = sources[id(v)]
        out[f"model/{i:05d}"] = _assemble([value[id(p)] for p in parts], stacked)

    trainable = legacy.trainable_variables
    if ema:
        ema_value = dict(zip(map(id, trainable), _prefixed(arrays, "ema"), strict=True))
        for i, v in enumerate(model.trainable_variables):
            parts, stacked = sources[id(v)]
            out[f"ema/{i:05d}"] = _assemble([ema_value[id(p)] for p in parts], stacked)

    if optimizer is None:
        return {k: np.asarray(keras.ops.convert_to_numpy(a)) for k, a in out.items()}
    # Keras names an optimizer's slot "<path of its weight, '/' as '_'>_<slot>"; an optimizer
    # like the run's, built on the unstacked weights, gives the checkpoint's order of them.
    twin = type(optimizer).from_config(optimizer.get_config())
    twin.build(trainable)
    saved_slots = _prefixed(arrays, "optimizer")
    if len(saved_slots) != len(twin.variables):
        raise ValueError(
            f"checkpoint holds {len(saved_slots)} optimizer arrays, the unstacked model's "
            f"optimizer {len(twin.variables)}"
        )
    slot_value = {v.name: a for v, a in zip(twin.variables, saved_slots, strict=True)}
    legacy_names = {id(v): v.path.replace("/", "_") for v in trainable}
    by_name = {}
    for v in model.trainable_variables:
        by_name[v.path.replace("/", "_")] = sources[id(v)]
    for i, opt_var in enumerate(optimizer.variables):
        name = opt_var.name
        owner = max((n for n in by_name if name.startswith(n + "_")), key=len, default=None)
        if owner is None:
            out[f"optimizer/{i:05d}"] = slot_value[name]
            continue
        slot = name[len(owner) + 1 :]
        parts, stacked = by_name[owner]
        rows = [slot_value[f"{legacy_names[id(p)]}_{slot}"] for p in parts]
        out[f"optimizer/{i:05d}"] = _assemble(rows, stacked)
    return {k: np.asarray(keras.ops.convert_to_numpy(a)) for k, a in out.items()}


def is_noise_seed_array(array: np.ndarray) -> bool:
    """Whether a checkpoint's model array is the state of a Keras ``SeedGenerator`` (shape
    (2,), or (blocks, 2) stacked, of an integer dtype): every weight of the model is a float."""
    dtype = np.dtype(array.dtype)
    return np.issubdtype(dtype, np.integer) and array.ndim in (1, 2) and array.shape[-1] == 2


def without_noise_seeds(arrays: dict[str, np.ndarray], model: Any) -> dict[str, np.ndarray]:
    """``arrays`` without the noise streams' states of a checkpoint written while the model
    drew its own noise, the rest renumbered in order; unchanged when it holds none, or when
    the model itself has integer variables (then they are its own)."""
    if any(
        _dtype_family(keras.backend.standardize_dtype(v.dtype)) != "float" for v in model.variables
    ):
        return arrays
    names = sorted(k for k in arrays if k.startswith("model/"))
    kept = [k for k in names if not is_noise_seed_array(np.asarray(arrays[k]))]
    if len(kept) == len(names):
        return arrays
    out = {k: v for k, v in arrays.items() if not k.startswith("model/")}
    out.update({f"model/{i:05d}": arrays[k] for i, k in enumerate(kept)})
    return out


def in_model_layout(
    arrays: dict[str, np.ndarray], model: Any, optimizer: Any, ema: bool
) -> dict[str, np.ndarray]:
    """A checkpoint's ``arrays`` in ``model``'s layout: without the noise seeds of an older
    checkpoint (:func:`without_noise_seeds`), and converted when it was written with one set
    of weights per block and the model stacks them (see :func:`from_unstacked`)."""
    arrays = without_noise_seeds(arrays, model)
    saved = sum(1 for k in arrays if k.startswith("model/"))
    if saved != len(model.variables) and getattr(model, "stack_blocks", False):
        return from_unstacked(arrays, model, optimizer, ema)
    return arrays


def assign_saved(arrays: dict[str, np.ndarray], prefix: str, variables: list[Any]) -> None:
    """Give ``variables`` the checkpoint's ``prefix/NNNNN`` arrays, in order; a ValueError
    says what does not fit (count or shape)."""
    names = sorted(k for k in arrays if k.startswith(prefix + "/"))
    if len(names) != len(variables):
        raise ValueError(
            f"checkpoint holds {len(names)} {prefix} arrays, the model {len(variables)}"
        )
    for name, v in zip(names, variables, strict=True):
        if tuple(arrays[name].shape) != tuple(v.shape):
            raise ValueError(
                f"{name}: shape {arrays[name].shape} in the checkpoint, "
                f"{tuple(v.shape)} in the model"
            )
        saved = keras.backend.standardize_dtype(arrays[name].dtype)
        wanted = keras.backend.standardize_dtype(v.dtype)
        family = _dtype_family(wanted)
        # A float's width too: hvae writes every float variable as it is (float32, the master
        # weights under mixed_bfloat16 included), so float16 or float64 is another program's
        # file, which assignment would silently round or widen.
        if _dtype_family(saved) != family or (family == "float" and saved != wanted):
            raise ValueError(f"{name}: dtype {saved} in the checkpoint, {wanted} in the model")
    for name, v in zip(names, variables, strict=True):
        v.assign(arrays[name])


def _dtype_family(dtype: str) -> str:
    """float, integer or bool: a checkpoint's array must be of its variable's family. Integer
    widths may differ (JAX without x64 keeps int64 counters as int32) and are cast on
    assignment; float widths may not (see :func:`assign_saved`)."""
    if "float" in dtype:  # bfloat16 too
        return "float"
    if dtype.startswith(("int", "uint")):
        return "integer"
    return dtype


def copy_weights(source: Any, target: Any) -> None:
    """``source``'s variables into ``target``, an identically built model (for instance one
    rebuilt in another precision, which casts them)."""
    pairs = list(zip(source.variables, target.variables, strict=True))
    for a, b in pairs:
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"cannot copy {a.path} of shape {a.shape} into {b.shape}")
        b.assign(keras.ops.cast(a.value, b.dtype))
