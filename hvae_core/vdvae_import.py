"""openai/vdvae's published checkpoints as hvae run directories.

VDVAE (Child 2021) saves ``torch.save(model.state_dict())`` of its ``VAE``: tensors named like
``encoder.enc_blocks.12.c2.weight`` and ``decoder.dec_blocks.3.prior.c4.bias``. hvae's presets
``cifar10``, ``imagenet32``, ``imagenet64``, ``ffhq256`` and ``ffhq1024`` are VDVAE's
hyper-parameter sets block for block, so every tensor has exactly one hvae weight:

- a block's ``c1..c4`` are the residual block's ``conv1..conv4`` (kernels OIHW -> HWIO);
- a decoder block's ``enc`` is its ``posterior``, ``prior``, ``z_proj`` and ``resnet`` keep
  their names; VDVAE's decoder blocks and hvae's latent layers run in the same order (top
  first), and so do the encoder blocks, scale by scale;
- ``decoder.bias_xs.K`` is the top-down pass's learned starting state of the K-th resolution
  with one, smallest first (NCHW -> NHWC);
- ``decoder.gain``/``decoder.bias`` and ``decoder.out_net.out_conv`` make hvae's output head;
  the output channels are reordered from VDVAE's likelihood layout (per colour channel: means,
  log-scales, coefficients) to hvae's (see :mod:`hvae_core.model.likelihood`).

A run of identical blocks, whose weights hvae stacks, takes its blocks' tensors row by row.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.errors import HvaeError

PRESETS = ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024")
SOURCE = "openai/vdvae"
_PREFIX = "module."  # what DistributedDataParallel's state dicts put before every name


class VdvaeImportError(HvaeError):
    """A file that cannot be imported; the message names the tensor or the problem."""


# -- reading a .th file ----------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict file, as float32 numpy arrays by name (DDP's
    ``module.`` prefix dropped). Read by :mod:`hvae_core.torch_files`, without PyTorch: a file
    holding any pickled object other than tensors and dicts is refused, nothing of it run."""
    path = Path(path)
    if not path.is_file():
        raise VdvaeImportError(
            f"{path} is not a file" if path.exists() else f"{path} does not exist",
            hint="give the .th file of a VDVAE checkpoint (e.g. cifar10-seed0-iter-1050000-"
            "model-ema.th)",
        )
    from hvae_core import torch_files

    try:
        loaded = torch_files.load(path)
    except torch_files.UnsafeFile as exc:
        raise VdvaeImportError(
            f"{path} holds pickled objects other than tensors ({str(exc)[:80]}); refused "
            "(loading them could run code)",
            hint="give a state dict saved with torch.save(model.state_dict())",
        ) from None
    except (torch_files.NotATorchFile, OSError) as exc:
        raise VdvaeImportError(
            f"cannot read {path} as a PyTorch file: {str(exc)[:200]}",
            hint="the file may be truncated or not a checkpoint; download it again",
        ) from None
    if not isinstance(loaded, Mapping):
        raise VdvaeImportError(
            f"{path} holds a {type(loaded).__name__}, not a state dict",
            hint="give a file saved with torch.save(model.state_dict())",
        )
    if "model" in loaded and isinstance(loaded["model"], Mapping):
        loaded = loaded["model"]  # a training checkpoint wrapping the state dict
    arrays: dict[str, np.ndarray] = {}
    for name, value in loaded.items():
        key = str(name)
        key = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if not isinstance(value, np.ndarray):
            raise VdvaeImportError(
                f"{path}: entry {key[:80]!r} is a {type(value).__name__}, not a tensor",
                hint="give a file saved with torch.save(model.state_dict())",
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise VdvaeImportError(
                f"{path}: tensor {key} is {value.dtype}, not floating point",
                hint="give the model's (or its EMA's) state dict",
            )
        arrays[key] = value.astype(np.float32)
    if not arrays:
        raise VdvaeImportError(f"{path} holds no tensors", hint="give a VDVAE model state dict")
    return arrays


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- which preset, at which widths -----------------------------------------------------------

_ENC = re.compile(r"encoder\.enc_blocks\.(\d+)\.")
_DEC = re.compile(r"decoder\.dec_blocks\.(\d+)\.")
_BIAS = re.compile(r"decoder\.bias_xs\.(\d+)$")


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: re.Pattern[str]) -> int:
    found = {int(m.group(1)) for name in shapes if (m := pattern.match(name))}
    return max(found) + 1 if found else 0


def _layout_counts(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int]:
    """Encoder blocks, decoder blocks and learned starting states among tensor ``shapes``."""
    return _count(shapes, _ENC), _count(shapes, _DEC), _count(shapes, _BIAS)


def preset_config(name: str, overrides: tuple[str, ...] = ()) -> Any:
    from hvae_core.config import resolve_config

    return resolve_config(name, overrides=overrides)


def recognise(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The preset whose block layout the state dict has (counts of encoder blocks, decoder
    blocks and starting states); one line when none or several do."""
    counts = _layout_counts(shapes)
    if counts[1] == 0:
        raise VdvaeImportError(
            "the file holds no tensor named decoder.dec_blocks.N...: not a VDVAE model",
            hint="give the model or EMA state dict of openai/vdvae (…-model-ema.th)",
        )
    matches = [
        name for name in PRESETS if _layout_counts(expected_shapes(preset_config(name))) == counts
    ]
    if len(matches) != 1:
        described = f"{counts[0]} encoder blocks, {counts[1]} decoder blocks, {counts[2]} biases"
        raise VdvaeImportError(
            f"the file's layout ({described}) is "
            + ("none of" if not matches else "ambiguous among")
            + " the VDVAE presets",
            hint=f"give --preset (one of {', '.join(PRESETS)})",
        )
    return matches[0]


def width_overrides(config: Any, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """``--set`` overrides that give ``config``'s model the widths, latent widths and mixture
    count of the state dict (e.g. a VDVAE model trained at another width); empty when the
    preset's own fit. Scales without blocks take the width of the scale below them."""
    model = config.model
    resolutions = config.resolutions
    enc_first, dec_first = [], []
    e = d = 0
    for n_enc in model.enc_num_blocks:
        enc_first.append(e if n_enc else None)
        e += n_enc
    # Decoder blocks run top (1x1) first: the per-scale lists run from the largest scale.
    starts = {}
    for i in reversed(range(len(resolutions))):
        starts[i] = d if model.dec_num_blocks[i] else None
        d += model.dec_num_blocks[i]
    dec_first = [starts[i] for i in range(len(resolutions))]

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise VdvaeImportError(
                f"the file has no tensor {name}, which the {config_name(config)} layout needs",
                hint="give --preset matching the file, or check that it is a VDVAE model",
            )
        return shapes[name]

    width, enc_mid, dec_mid, z_width = [], [], [], []
    for i in range(len(resolutions)):
        w = em = dm = z = None
        if enc_first[i] is not None:
            em, w = shape(f"encoder.enc_blocks.{enc_first[i]}.c1.weight")[:2]
        if dec_first[i] is not None:
            dm, w = shape(f"decoder.dec_blocks.{dec_first[i]}.resnet.c1.weight")[:2]
            z = shape(f"decoder.dec_blocks.{dec_first[i]}.z_proj.weight")[1]
        width.append(w)
        enc_mid.append(em)
        dec_mid.append(dm)
        z_width.append(z)
    for values in (width, z_width):  # scales without blocks: the scale below them
        for i in reversed(range(len(values) - 1)):
            if values[i] is None:
                values[i] = values[i + 1]
        for i in range(1, len(values)):
            if values[i] is None:
                values[i] = values[i - 1]
    enc_mid = [m if m is not None else max(1, w // 4) for m, w in zip(enc_mid, width, strict=True)]
    dec_mid = [m if m is not None else max(1, w // 4) for m, w in zip(dec_mid, width, strict=True)]
    out = shape("decoder.out_net.out_conv.weight")[0]
    if out % 10:
        raise VdvaeImportError(
            f"decoder.out_net.out_conv.weight has {out} outputs; VDVAE's RGB likelihood has "
            "10 per mixture component",
            hint="only RGB VDVAE models can be imported",
        )
    found = {
        "stage_in_width": width,
        "enc_middle_width": enc_mid,
        "dec_middle_width": dec_mid,
        "z_width": z_width,
    }
    overrides = [
        f"model.{key}={values[0] if len(set(values)) == 1 else values}"
        for key, values in found.items()
        if list(values) != list(getattr(model, key))
    ]
    if out // 10 != model.num_output_mixtures:
        overrides.append(f"model.num_output_mixtures={out // 10}")
    return overrides


def config_name(config: Any) -> str:
    return f"{config.data.dataset} ({config.image_size}x{config.image_size})"


# -- the tensors a preset's model has ---------------------------------------------------------


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the VDVAE model that ``config`` describes, with its shape as VDVAE
    saves it (NCHW, kernels OIHW): what a state dict must hold, known before any model is
    built (:func:`targets` gives the same from a built model)."""
    from hvae_core.model.layout import scales
    from hvae_core.model.likelihood import dmol_num_params

    model = config.model
    layout = scales(model, config.resolutions)
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, out: int, into: int, k: int) -> None:
        shapes[f"{prefix}.weight"] = (out, into, k, k)
        shapes[f"{prefix}.bias"] = (out,)

    def block(prefix: str, into: int, middle: int, out: int, k: int) -> None:
        conv(f"{prefix}.c1", middle, into, 1)
        conv(f"{prefix}.c2", middle, middle, k)
        conv(f"{prefix}.c3", middle, middle, k)
        conv(f"{prefix}.c4", out, middle, 1)

    top = layout[0].width
    conv("encoder.in_conv", top, 3, 3)
    n = 0
    for s in layout:
        for _ in range(s.enc_blocks):
            block(f"encoder.enc_blocks.{n}", s.width, s.enc_middle_width, s.width, s.kernel_size)
            n += 1
    n = bias = 0
    for s in reversed(layout):  # top (1x1) first
        w, mid, z, k = s.width, s.dec_middle_width, s.z_width, s.kernel_size
        for _ in range(s.dec_blocks):
            prefix = f"decoder.dec_blocks.{n}"
            block(f"{prefix}.enc", 2 * w, mid, 2 * z, k)
            block(f"{prefix}.prior", w, mid, 2 * z + w, k)
            conv(f"{prefix}.z_proj", w, z, 1)
            block(f"{prefix}.resnet", w, mid, w, k)
            n += 1
        r = s.resolution
        if (
            s.dec_blocks
            and not (r == 1 and model.init_zeros)
            and (model.no_bias_above is None or r <= model.no_bias_above)
        ):
            shapes[f"decoder.bias_xs.{bias}"] = (1, w, r, r)
            bias += 1
    shapes["decoder.gain"] = shapes["decoder.bias"] = (1, top, 1, 1)
    conv("decoder.out_net.out_conv", dmol_num_params(3, model.num_output_mixtures), top, 1)
    return shapes


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """One line naming the first tensor that is missing, left over or of another shape."""
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise VdvaeImportError(
            f"the file has no tensor {missing[0]} (of shape {expected[missing[0]]}) that the "
            f"{what} model needs" + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""),
            hint="give --preset matching the file, or check that it is a whole VDVAE model",
        )
    extra = sorted(name for name in shapes if name not in expected)
    if extra:
        raise VdvaeImportError(
            f"the file's tensor {extra[0]} (shape {tuple(shapes[extra[0]])}) has no place in the "
            f"{what} model" + (f", nor {len(extra) - 1} more" if len(extra) > 1 else ""),
            hint="give --preset matching the file",
        )
    for name, want in expected.items():
        if tuple(shapes[name]) != tuple(want):
            raise VdvaeImportError(
                f"tensor {name} has shape {tuple(shapes[name])} in the file; the {what} model "
                f"needs {tuple(want)}",
                hint="give --preset matching the file",
            )


# -- every tensor to one weight --------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An hvae variable and how a VDVAE tensor becomes its value."""

    variable: Any
    convert: Callable[[np.ndarray], np.ndarray]
    vdvae_shape: tuple[int, ...]


def _kernel(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 2, 3, 1))


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)


def likelihood_order(num_mixtures: int) -> np.ndarray:
    """For each of hvae's likelihood outputs (RGB), the index of VDVAE's output it is.

    VDVAE: M logits, then per colour channel c: M means, M log-scales, M coefficients, where
    the coefficients of channel slot 0, 1, 2 weigh (G by R), (B by R), (B by G). hvae: M
    logits, means [M, C], scale logits [M, C], coefficients [M, 3] in the same pair order."""
    m, c = num_mixtures, 3
    order = list(range(m))
    for part in (0, 1):  # means, then log-scales
        order += [m + ch * 3 * m + part * m + k for k in range(m) for ch in range(c)]
    order += [m + pair * 3 * m + 2 * m + k for k in range(m) for pair in range(3)]
    return np.asarray(order)


def _conv(layer: Any, prefix: str) -> dict[str, Target]:
    kernel, bias = layer.kernel, layer.bias
    h, w, i, o = (int(d) for d in kernel.shape)
    return {
        f"{prefix}.weight": Target(kernel, _kernel, (o, i, h, w)),
        f"{prefix}.bias": Target(bias, lambda a: a, (o,)),
    }


def _block(block: Any, prefix: str) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for j, conv in enumerate(block.convs):
        targets.update(_conv(conv, f"{prefix}.c{j + 1}"))
    return targets


def targets(model: Any) -> dict[str, Target]:
    """Every VDVAE tensor name of ``model`` (a built :class:`~hvae_core.model.hvae.HVAE`) and
    the weight it becomes: a block's own, which for blocks in a stacked run is the member's
    (see :func:`assign`)."""
    out = _conv(model.encoder.in_conv, "encoder.in_conv")
    for i, block in enumerate(b for stage in model.encoder.stages for b in stage):
        out.update(_block(block, f"encoder.enc_blocks.{i}"))
    for i, block in enumerate(model.decoder.blocks):
        prefix = f"decoder.dec_blocks.{i}"
        out.update(_block(block.posterior, f"{prefix}.enc"))
        out.update(_block(block.prior, f"{prefix}.prior"))
        out.update(_conv(block.z_proj, f"{prefix}.z_proj"))
        out.update(_block(block.resnet, f"{prefix}.resnet"))
    biases = sorted(model.decoder.biases.items(), key=lambda item: int(item[0]))
    for k, (_, bias) in enumerate(biases):
        _, r, _, w = (int(d) for d in bias.shape)
        out[f"decoder.bias_xs.{k}"] = Target(bias, _nhwc, (1, w, r, r))
    head = model.head
    width = int(head.gain.shape[0])
    out["decoder.gain"] = Target(head.gain, _flat, (1, width, 1, 1))
    out["decoder.bias"] = Target(head.bias, _flat, (1, width, 1, 1))
    order = likelihood_order(model.num_mixtures)
    conv = _conv(head.out_conv, "decoder.out_net.out_conv")
    kernel, bias = conv["decoder.out_net.out_conv.weight"], conv["decoder.out_net.out_conv.bias"]
    out["decoder.out_net.out_conv.weight"] = Target(
        kernel.variable, lambda a: _kernel(a)[..., order], kernel.vdvae_shape
    )
    out["decoder.out_net.out_conv.bias"] = Target(
        bias.variable, lambda a: a[order], bias.vdvae_shape
    )
    return out


def assign(model: Any, state: Mapping[str, np.ndarray], what: str) -> None:
    """Give every weight of ``model`` its tensor of ``state`` (whose names and shapes
    :func:`check_shapes` has passed). A run of stacked blocks takes its members' tensors row
    by row; one line when the model has a weight that no tensor fills (a flow, attention)."""
    from hvae_core.model.weights import runs_of

    mapping = targets(model)
    shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    check_shapes(shapes, {k: t.vdvae_shape for k, t in mapping.items()}, what)
    values = {id(t.variable): t.convert(np.asarray(state[k])) for k, t in mapping.items()}
    filled = set()
    for run in runs_of(model):
        for variable, position in run.stacked_variables():
            variable.assign(np.stack([values[id(m.variables[position])] for m in run.members]))
            filled.add(id(variable))
    for variable in model.variables:
        if id(variable) in values:
            variable.assign(values[id(variable)])
            filled.add(id(variable))
    unfilled = [v.path for v in model.variables if id(v) not in filled]
    if unfilled:
        raise VdvaeImportError(
            f"the {what} model has weights VDVAE's has not (e.g. {unfilled[0]})",
            hint="import with a VDVAE preset's model, without flows or attention",
        )


# -- the run directory -----------------------------------------------------------------------


def _position() -> dict[str, Any]:
    """A run that has trained no step here (its fields as :class:`Trainer` saves them)."""
    return {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "consecutive_skips": 0,
        "best_val": None,
        "bad_epochs": 0,
        "epoch_seconds": 0.0,
        "sums": {},
    }


@dataclass(frozen=True)
class Imported:
    run_dir: Path
    preset: str
    parameters: int
    tensors: int
    overrides: tuple[str, ...]


def import_vdvae(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    overrides: tuple[str, ...] = (),
    save_dir: str | os.PathLike[str] | None = None,
) -> Imported:
    """Write an hvae run directory holding the VDVAE checkpoint ``path``: ``out`` (a new
    folder) or a new one under ``save_dir`` (default: the preset's ``run.save_dir``).
    ``preset``: one of :data:`PRESETS` (default: recognised from the tensors); ``overrides``:
    more ``--set`` overrides (e.g. ``run.backend=torch``). Keras' backend must be chosen and
    importable; the weights are written as both the model's and its EMA."""
    import keras

    from hvae_core.model.hvae import HVAE
    from hvae_core.run import RunDirectory
    from hvae_core.run import checkpoint as checkpoint_meta

    if preset is not None and preset not in PRESETS:
        raise VdvaeImportError(
            f"unknown VDVAE preset '{preset}'", hint=f"choose one of {', '.join(PRESETS)}"
        )
    target_dir = _check_out(out) if out is not None else None
    state = read_state_dict(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    name = preset or recognise(shapes)
    base = preset_config(name, overrides)
    sized = tuple(width_overrides(base, shapes))
    config = preset_config(name, (*sized, *overrides))
    what = f"'{name}' preset's" + (" (at the file's widths)" if sized else "")
    check_shapes(shapes, expected_shapes(config), what)  # before minutes of building
    image_shape = (config.image_size, config.image_size, 3)
    num_bits = config.data.num_bits or 8

    model = HVAE(config, image_shape, num_bits)
    model.build_weights()
    assign(model, state, what)
    arrays = {
        f"model/{i:05d}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)
    }
    ema = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    arrays.update({f"ema/{i:05d}": a for i, a in enumerate(ema)})
    meta = checkpoint_meta.metadata(
        _position(), num_bits, image_shape, checkpoint_meta.plugins_used(config), config
    )
    meta["provenance"] = {
        "source": f"imported from {SOURCE}",
        "file": Path(path).name,
        "sha256": sha256_of(path),
        "preset": name,
    }
    if target_dir is not None:
        target_dir.mkdir(parents=True, exist_ok=True)
        run = RunDirectory(target_dir)
        with run.writing():
            run.write_config(config)
            run.save_checkpoint(arrays, meta)
    else:
        run = RunDirectory.create(save_dir or config.run.save_dir, config)
        try:
            run.save_checkpoint(arrays, meta)
        finally:
            run.unlock()
    return Imported(run.path, name, model.count_params(), len(state), sized)


def _check_out(out: str | os.PathLike[str]) -> Path:
    """``out`` when a new run directory can be made there: absent, or an empty folder."""
    if str(out) == "":
        raise VdvaeImportError("--out is empty", hint="give a folder for the run directory")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise VdvaeImportError(
            f"{path} already exists" + (" and is not empty" if path.is_dir() else ""),
            hint="give a new folder for the imported run",
        )
    return path
