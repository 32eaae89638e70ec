"""Typed configuration: sections, sources and their precedence, per-scale lists, validation.

Sources, lowest to highest: the defaults below < a preset shipped with hvae (``--config cifar10``)
or a user YAML file (``--config my.yaml``) < CLI flags < ``--set section.key=value``.

Besides the core sections (``model``, ``data``, ``training``, ``run``) the config has one section
per chosen plugin, named after its kind (``dataset``, ``block``, ``flow``, ``attention``,
``regularizer``, ``lr_schedule``, ``beta_schedule``), holding that plugin's own options. A run
may choose several trackers (``run.trackers``): their section ``tracker`` holds one mapping of
options per chosen tracker, by name (``tracker.NAME.KEY``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from hvae_core.backends.select import Backend
from hvae_core.data import sources
from hvae_core.errors import ConfigError
from hvae_core.hookspecs import KINDS
from hvae_core.options import build_section, clipped, option, per_scale, section_to_dict
from hvae_core.plugins import PluginRegistry, get_registry
from hvae_core.strict_yaml import load_yaml

Activation = Literal[
    "silu", "swish", "gelu", "relu", "elu", "leaky_relu", "mish", "selu", "softplus", "tanh"
]


def _clip(value: Any) -> str:
    return clipped(repr(value))


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        values = value if isinstance(value, list) else [value]
        if any(v <= 0 for v in values):
            raise ConfigError(
                f"{section}.{name}: expected values > 0, got {_clip(value)}",
                hint=f"give {section}.{name} a positive value",
            )


def _non_negative(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        values = value if isinstance(value, list) else [value]
        if any(v < 0 for v in values):
            raise ConfigError(
                f"{section}.{name}: expected values >= 0, got {_clip(value)}",
                hint=f"give {section}.{name} zero or a positive value",
            )


@dataclass
class ModelConfig:
    """The HVAE architecture. Per-scale lists run from the largest scale down to 1x1."""

    block: str = option("vdvae", "residual block type (a 'block' plugin)")
    flow: str | None = option(None, "posterior flow (a 'flow' plugin), or null for none")
    attention: str | None = option(None, "attention (an 'attention' plugin), or null for none")
    output_head: Literal["aggregate", "decoder"] = option(
        "aggregate",
        "likelihood head: 'aggregate' sums every block's projected latents (DVP-VAE); "
        "'decoder' uses the final top-down state (VDVAE)",
    )
    b_act: Activation = option("silu", "activation inside residual blocks")
    p_act: Activation = option("silu", "activation after a pooling convolution")
    block_gn: bool = option(False, "GroupNorm (8 groups) inside residual blocks")
    depthwise: bool = option(False, "shorthand for block: depthwise (5x5 depthwise convolutions)")
    pool_block: bool = option(
        False,
        "VDVAE's pooling: the last encoder block of a scale runs before the pooling and its "
        "output is not kept as that scale's activation",
    )
    width_change: Literal["conv", "pad"] = option(
        "conv",
        "how the width changes between scales of different widths: 'conv' (a 1x1 convolution "
        "and p_act after the resampling) or 'pad' (VDVAE: zero channels added going down, the "
        "first channels kept going up; no weights)",
    )
    increase_kernelsize: bool = option(False, "larger kernels at larger scales")
    init_zeros: bool = option(False, "start the 1x1 top-down state from zeros, not a learned bias")
    no_bias_above: int | None = option(
        None,
        "learned starting states of the top-down pass only at resolutions up to this one; "
        "above it a scale starts from its upsampled state alone (VDVAE's no_bias_above; "
        "null: at every resolution)",
    )
    input_shift: float = option(
        0.0,
        "the encoder sees (x + input_shift) * input_scale for images x in [-1, 1] (VDVAE's "
        "per-dataset normalisation); the likelihood scores x itself",
    )
    input_scale: float = option(1.0, "see input_shift")
    num_output_mixtures: int = option(5, "logistic mixture components per pixel")
    gradient_smoothing: float = option(
        0.6931472, "beta of the softplus giving the Gaussian scales (ln 2: softplus(0) = 1)"
    )
    scale_fn: Literal["softplus", "exp"] = option(
        "softplus",
        "how raw outputs become scales: 'softplus' (Efficient-VDVAE: softplus with the "
        "gradient_smoothing beta; latent scales at least 1e-5, DMoL scales at least e^-7) or "
        "'exp' (VDVAE: latent scale exp(raw), DMoL log-scale max(raw, -7))",
    )
    stage_in_width: list[int] = per_scale(
        [32], "residual width per scale (outer 1x1 channels of the blocks)"
    )
    enc_middle_width: list[int] = per_scale([16], "inner width of encoder blocks per scale")
    dec_middle_width: list[int] = per_scale([16], "inner width of decoder blocks per scale")
    z_width: list[int] = per_scale([4], "latent channels per scale")
    enc_num_blocks: list[int] = per_scale([1], "encoder blocks per scale (0 allowed)")
    dec_num_blocks: list[int] = per_scale([1], "top-down blocks per scale (0 allowed)")
    output_blocks: int = option(1, "residual blocks on the aggregated latents ('aggregate' head)")
    z_out_width: int = option(32, "outer width of the output blocks ('aggregate' head)")
    z_out_middle_width: int = option(16, "inner width of the output blocks ('aggregate' head)")
    precision: Literal["float32", "mixed_bfloat16"] = option(
        "float32", "Keras dtype policy; the likelihood, KL and loss always stay float32"
    )

    def validate(self, section: str) -> None:
        _positive(
            section,
            self,
            "num_output_mixtures",
            "gradient_smoothing",
            "stage_in_width",
            "enc_middle_width",
            "dec_middle_width",
            "z_width",
            "z_out_width",
            "z_out_middle_width",
        )
        _non_negative(section, self, "enc_num_blocks", "dec_num_blocks", "output_blocks")
        if self.no_bias_above is not None:
            _positive(section, self, "no_bias_above")
        for name in ("input_shift", "input_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or (name == "input_scale" and value == 0):
                raise ConfigError(
                    f"{section}.{name}: expected a finite number"
                    f"{' other than 0' if name == 'input_scale' else ''}, got {_clip(value)}",
                    hint="the encoder's input must stay finite and informative",
                )
        if sum(self.dec_num_blocks) == 0:
            raise ConfigError(
                f"{section}.dec_num_blocks: expected at least one top-down block, got "
                f"{self.dec_num_blocks!r}",
                hint="give at least one scale a top-down block, e.g. dec_num_blocks: 1",
            )


@dataclass
class DataConfig:
    dataset: str = option("digits", "dataset (a 'dataset' plugin)")
    data_dir: str | None = option(
        None,
        "directory holding the dataset files (default: $HVAE_DATA_DIR; a dataset's own "
        "dataset.path wins)",
    )
    num_bits: int | None = option(None, "reduce pixels to this bit depth (default: the dataset's)")
    random_flip: bool = option(False, "random horizontal flips of training images")

    def validate(self, section: str) -> None:
        if self.num_bits is not None and not 1 <= self.num_bits <= 8:
            raise ConfigError(
                f"{section}.num_bits: expected 1 to 8, got {self.num_bits}",
                hint="images have 8 bits per channel at most; null keeps the dataset's",
            )


@dataclass
class TrainingConfig:
    epochs: int = option(100, "number of passes over the training split")
    batch_size: int = option(32, "global batch size")
    batch_size_div: int = option(
        1, "gradient accumulation: steps of batch_size / batch_size_div per update"
    )
    optimizer: Literal["adamax", "adamw", "adam"] = option("adamax", "optimizer (Keras' own)")
    learning_rate: float = option(2e-3, "peak learning rate")
    learning_rate_end: float = option(1e-4, "final learning rate of decaying schedules")
    lr_warmup_epochs: float = option(1.0, "linear learning-rate warm-up, in epochs")
    scheduler: str = option("cosd", "learning-rate schedule (an 'lr-schedule' plugin)")
    adam_beta1: float = option(0.9, "first-moment decay of Adam-family optimizers")
    adam_beta2: float = option(0.999, "second-moment decay of Adam-family optimizers")
    weight_decay: float = option(0.01, "decoupled weight decay")
    use_ema: bool = option(True, "keep an exponential moving average of the weights")
    ema_rate: float = option(0.99, "EMA decay per update")
    grad_norm_unit: Literal["nats", "bits"] = option(
        "nats",
        "the scale of gradient_clipnorm, gradient_skipnorm and the logged gradient norms: the "
        "gradient of the loss in nats per dimension (VDVAE's and Efficient-VDVAE's scale) or "
        "in bits per dimension (what hvae used before; 1/ln 2 = 1.44x larger)",
    )
    gradient_clipnorm: float = option(
        200.0, "clip the global gradient norm, on the grad_norm_unit scale, to this (0: off)"
    )
    gradient_skipnorm: float = option(
        0.0,
        "skip updates whose global gradient norm, on the grad_norm_unit scale, is this or more "
        "(0: off)",
    )
    skipnorm_warmup_epochs: float = option(
        0.0, "skip on gradient_skipnorm only after this many epochs (early norms run large)"
    )
    beta: float = option(1.0, "weight of the KL term once warmed up")
    beta_warmup_epochs: float = option(0.0, "epochs over which beta rises from 0 (0: off)")
    beta_schedule: str = option("linear-warmup", "beta schedule (a 'beta-schedule' plugin)")
    cyclic_beta: bool = option(False, "shorthand for beta_schedule: cyclic")
    number_cycles: int = option(1, "cycles of the cyclic beta schedule")
    early_stopping: int = option(0, "stop after this many epochs without val improvement (0: off)")
    max_consecutive_skips: int = option(
        500, "stop the run when this many updates in a row are skipped (0: never)"
    )
    checkpoint_minutes: float = option(10.0, "also checkpoint every this many minutes (0: off)")
    regularizer: str | None = option(None, "training regularizer (a 'regularizer' plugin)")
    seed: int = option(0, "random seed of the run")

    def validate(self, section: str) -> None:
        _positive(section, self, "batch_size", "batch_size_div", "learning_rate", "number_cycles")
        _non_negative(
            section,
            self,
            "epochs",
            "learning_rate_end",
            "lr_warmup_epochs",
            "weight_decay",
            "gradient_clipnorm",
            "gradient_skipnorm",
            "skipnorm_warmup_epochs",
            "beta",
            "beta_warmup_epochs",
            "early_stopping",
            "max_consecutive_skips",
            "checkpoint_minutes",
        )
        if self.batch_size % self.batch_size_div:
            raise ConfigError(
                f"{section}.batch_size_div: {self.batch_size_div} does not divide "
                f"{section}.batch_size {self.batch_size}",
                hint="pick a batch_size_div that divides the batch size",
            )
        for name in ("ema_rate", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(
                    f"{section}.{name}: expected a number in [0, 1), got {getattr(self, name)}",
                    hint="a decay rate such as 0.9 or 0.999",
                )
        if not 0 <= self.seed < 2**32:
            # NumPy's and the backends' seeds are unsigned 32-bit integers.
            raise ConfigError(
                f"{section}.seed: expected 0 to 2**32 - 1 ({2**32 - 1}), got {self.seed}",
                hint="any seed in that range; runs with the same seed draw the same numbers",
            )


@dataclass
class RunConfig:
    backend: Backend | None = option(
        None, "Keras backend (default: $KERAS_BACKEND, else jax if installed, else tensorflow)"
    )
    jit: bool = option(True, "compile the train step (XLA on jax/tensorflow)")
    torch_compile: bool = option(
        False,
        "torch backend: run the train step's loss and gradients through torch.compile "
        "(faster steps, but minutes of compiling on a CPU: see README; other backends "
        "ignore it)",
    )
    compile_cache: bool = option(
        True,
        "keep compiled steps in the persistent compilation cache ($HVAE_CACHE_DIR, default "
        "~/.cache/hvae) so that later runs, resumes, evaluate and sample load them instead of "
        "compiling again ($HVAE_COMPILE_CACHE=0 also turns it off; see 'hvae cache info')",
    )
    remat_blocks: bool = option(
        True,
        "in a compiled step, recompute each repeated block's activations in the backward pass "
        "instead of storing them for every block: far less memory, about a third more "
        "compute (on a CPU the step is still faster: stored activations cost more to move)",
    )
    images_minutes: float = option(
        5.0,
        "write the sample and reconstruction grids and the metric plots at most every this "
        "many minutes (always after the last epoch and on an interrupt; 0: every epoch)",
    )
    save_dir: str = option("runs", "directory that run directories are created in")
    save: bool = option(
        True, "keep a run directory (config, metrics, checkpoints, images); false: print only"
    )
    devices: int = option(
        0,
        "data-parallel devices per process: 0 = every visible accelerator (one CPU when "
        "there is none); training.batch_size is the global batch, split evenly over them",
    )
    connect_timeout: int = option(
        120, "seconds to wait for the other processes of a multi-process run before failing"
    )
    gpus: int | str | None = option(
        None,
        "the GPUs this process may use, by index, e.g. '0,1' (CUDA_VISIBLE_DEVICES, set before "
        "the backend starts; default: all)",
    )
    trackers: list[str] = option(
        [],
        "experiment trackers ('tracker' plugins) that also receive the config, every epoch's "
        "metrics and the images (metrics.jsonl is always written); their options: tracker.NAME",
    )

    def validate(self, section: str) -> None:
        if self.torch_compile and not self.jit:
            raise ConfigError(
                f"{section}.torch_compile is true but {section}.jit is false (jit false runs "
                "every step eagerly)",
                hint=f"drop {section}.torch_compile, or set {section}.jit: true",
            )
        _non_negative(section, self, "devices")
        _non_negative(section, self, "images_minutes")
        _positive(section, self, "connect_timeout")
        if isinstance(self.gpus, int) and not isinstance(self.gpus, bool):
            self.gpus = str(self.gpus)  # `--set run.gpus=1` reads as a YAML number
        if self.gpus is not None and not re.fullmatch(r"\d+(,\d+)*", str(self.gpus)):
            raise ConfigError(
                f"{section}.gpus: expected GPU indices such as '0' or '0,1', got "
                f"{_clip(self.gpus)}",
                hint="comma-separated indices without spaces, as nvidia-smi numbers them",
            )
        twice = sorted({name for name in self.trackers if self.trackers.count(name) > 1})
        if twice:
            raise ConfigError(
                f"{section}.trackers: {', '.join(twice)} listed twice",
                hint="list each tracker once",
            )
        if self.trackers and not self.save:
            raise ConfigError(
                f"{section}.trackers: {', '.join(self.trackers)} chosen, but {section}.save is "
                "false (trackers run beside a kept run directory)",
                hint="drop --no-save, or the trackers",
            )


CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "run": RunConfig,
}

# kind -> (section, key) of the option that chooses that kind's plugin, and its config section.
SELECTOR: dict[str, tuple[str, str]] = {
    "dataset": ("data", "dataset"),
    "block": ("model", "block"),
    "flow": ("model", "flow"),
    "attention": ("model", "attention"),
    "regularizer": ("training", "regularizer"),
    "lr-schedule": ("training", "scheduler"),
    "beta-schedule": ("training", "beta_schedule"),
}
# kind -> (section, key) of the list option that chooses any number of that kind's plugins.
# Their options share one section: a mapping from each chosen plugin's name to its options.
MULTI_SELECTOR: dict[str, tuple[str, str]] = {"tracker": ("run", "trackers")}
PLUGIN_SECTION: dict[str, str] = {
    kind: kind.replace("-", "_") for kind in (*SELECTOR, *MULTI_SELECTOR)
}
NESTED_SECTIONS = frozenset(PLUGIN_SECTION[kind] for kind in MULTI_SELECTOR)

# The flag holding ``KIND=NAME`` choices (``--use``), one per kind; see :func:`parse_use`.
USE_FLAG = "use"

# CLI flag -> dotted config key.
FLAG_KEYS: dict[str, str] = {
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "flow": "model.flow",
    "attention": "model.attention",
    "regularizer": "training.regularizer",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "seed": "training.seed",
    "backend": "run.backend",
    "save_dir": "run.save_dir",
    "devices": "run.devices",
    "gpus": "run.gpus",
    "save": "run.save",
    "tracker": "run.trackers",
}


@dataclass
class Config:
    """A resolved, validated configuration."""

    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    run: RunConfig
    plugin_options: dict[str, Any]  # kind -> the chosen plugin's options instance
    image_size: int
    # The dataset, where resolving the config had to open it to learn its image size.

    @property
    def num_scales(self) -> int:
        return int(math.log2(self.image_size)) + 1

    @property
    def resolutions(self) -> list[int]:
        """Image size of every scale, largest first (the order of per-scale lists)."""
        return [self.image_size >> i for i in range(self.num_scales)]

    def selected(self, kind: str) -> str | None:
        section, key = SELECTOR[kind]
        return getattr(getattr(self, section), key)

    def options(self, kind: str) -> Any:
        """The chosen plugin's options of ``kind`` (None when none is chosen); for a kind that
        a run may choose several of (``tracker``), a dict from each chosen name to its options
        (empty when none is chosen)."""
        if kind in MULTI_SELECTOR:
            return self.plugin_options.get(kind, {})
        return self.plugin_options.get(kind)

    def to_dict(self) -> dict[str, Any]:
        out = {name: section_to_dict(getattr(self, name)) for name in CORE_SECTIONS}
        for kind in SELECTOR:
            if kind in self.plugin_options:
                out[PLUGIN_SECTION[kind]] = section_to_dict(self.plugin_options[kind])
        for kind in MULTI_SELECTOR:
            chosen = self.plugin_options.get(kind)
            if chosen:
                out[PLUGIN_SECTION[kind]] = {n: section_to_dict(o) for n, o in chosen.items()}
        return out

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_ConfigDumper, sort_keys=False)


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, lists (per-scale values) on one line."""

    def ignore_aliases(self, data: Any) -> bool:
        # A value shared by two options is written out twice: a config file stays plain.
        return True


_ConfigDumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def preset_names() -> list[str]:
    folder = resources.files("hvae_core.configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


# Far above any real config; a bigger file is surely not one, and need not be read whole.
MAX_CONFIG_BYTES = 1 << 20


def _looks_like_path(source: str) -> bool:
    return source.endswith((".yaml", ".yml")) or os.sep in source or Path(source).exists()


def _read_config_file(path: Path) -> str:
    """The text of a config file; never blocks (a FIFO is refused before it is opened)."""
    presets = f"give a YAML file or a preset name ({', '.join(preset_names())})"
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", hint=presets) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", hint=presets) from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"config file {path} is a folder", hint=presets)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(
            f"config file {path} is not a regular file (a device, a pipe or a socket)",
            hint="write the config to a file and give its path",
        )
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is {info.st_size:,} bytes; a config is a few kilobytes",
            hint="check that this is the file you meant",
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}",
            hint="check the file's permissions",
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text "
            f"(byte {exc.start + 1} is {data[exc.start]:#04x})",
            hint="a config is a YAML text file; save it as UTF-8",
        ) from None


def load_config_source(source: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML file path."""
    source = os.fspath(source)
    if _looks_like_path(source):
        path = Path(source)
        text, where = _read_config_file(path), f"config file {path}"
    else:
        resource = resources.files("hvae_core.configs") / f"{source}.yaml"
        if not resource.is_file():
            raise ConfigError(
                f"unknown config preset '{source}'",
                hint=f"presets: {', '.join(preset_names())}; or give a path to a YAML file",
            )
        text, where = resource.read_text(encoding="utf-8"), f"preset {source}"
    raw = load_yaml(text, where)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a mapping of sections, got {type(raw).__name__}",
            hint="a config maps section names to their options, e.g. 'training: {epochs: 10}'",
        )
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` (``tracker.NAME.key=value`` for a tracker's option) with a
    YAML-parsed value."""
    key, sep, text = item.partition("=")
    key = key.strip()
    shown = clipped(item)  # a value can be megabytes long; an error stays one readable line
    parts = key.split(".")
    depth = 3 if parts[0] in NESTED_SECTIONS else 2
    if not sep or len(parts) not in (2, depth) or not all(parts):
        raise ConfigError(
            f"--set {shown!r}: expected section.key=value",
            hint="e.g. --set model.z_width=[8,16], or --set tracker.NAME.KEY=VALUE",
        )
    value = load_yaml(text, f"--set {shown!r}", key) if text.strip() else None
    return key, value


def parse_use(item: str) -> tuple[str, str]:
    """``KIND=NAME`` (the CLI's ``--use``): the dotted key that chooses a plugin of that kind
    (see :data:`SELECTOR`) and the name."""
    kind, sep, name = (part.strip() for part in item.partition("="))
    kinds = ", ".join(k for k in KINDS if k in SELECTOR)
    if not sep or not kind or not name:
        raise ConfigError(
            f"--use {item}: expected KIND=NAME",
            hint=f"e.g. --use flow=conv-sylvester; kinds: {kinds}",
        )
    if kind in MULTI_SELECTOR:  # several may be chosen, so each has a repeatable flag
        raise ConfigError(
            f"--use {item}: a {kind} is not chosen with --use",
            hint=f"use --{kind} {name} (repeatable), or --set {'.'.join(MULTI_SELECTOR[kind])}"
            "=[...]",
        )
    if kind not in SELECTOR:
        close = difflib.get_close_matches(kind, list(SELECTOR), n=1)
        raise ConfigError(
            f"--use {item}: unknown plugin kind '{kind}'",
            hint=(f"did you mean '{close[0]}'? " if close else "") + f"kinds: {kinds}",
        )
    section, key = SELECTOR[kind]
    return f"{section}.{key}", name


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *path, name = key.split(".")
    target = raw
    for depth in range(len(path)):
        target = target.setdefault(path[depth], {})
        if not isinstance(target, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(
                f"{where}: expected a mapping of options, got {_clip(target)}",
                hint=f"set its options one by one, e.g. --set {where}.KEY=VALUE",
            )
    target[name] = value


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated section by section (a section in ``update`` does not replace it whole)."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
    return base


def resolve_config(
    config: str | os.PathLike[str] | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    registry: PluginRegistry | None = None,
    base: Mapping[str, Any] | None = None,
) -> Config:
    """Merge the sources in order of precedence and validate the result.

    ``flags`` maps CLI flag names (see ``FLAG_KEYS``) or dotted keys to values; None means unset.
    Its ``use`` entry is a sequence of ``KIND=NAME`` plugin choices (see :func:`parse_use`).
    ``base`` (a raw mapping, e.g. a run's stored config) replaces the defaults as the lowest layer.
    """
    raw: dict[str, Any] = merge({}, base or {})
    if config is not None:
        merge(raw, load_config_source(config))
    given: dict[str, str] = {}  # dotted key -> the flag that set it
    for name, value in (flags or {}).items():
        if value is not None and name != USE_FLAG:
            key = FLAG_KEYS.get(name, name)
            set_dotted(raw, key, value)
            given[key] = f"--{name.replace('_', '-')} {value}"
    for item in (flags or {}).get(USE_FLAG) or ():
        key, plugin = parse_use(item)
        section, _, option_name = key.partition(".")
        if key in given and raw[section][option_name] != plugin:
            raise ConfigError(
                f"--use {item} and {given[key]} choose two plugins for {key}",
                hint="choose each kind once",
            )
        set_dotted(raw, key, plugin)
        given[key] = f"--use {item}"
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return build_config(raw, registry)


def load_run_config(
    path: str | os.PathLike[str], registry: PluginRegistry | None = None, *, trackers: bool = True
) -> Config:
    """The config a run directory's ``config.yaml`` records.

    Options added to hvae after the run was written are absent from it; where the new default
    would change what the run does, the absent option means the old behaviour: a run that is
    resumed or evaluated must never silently change. ``trackers=False`` leaves the run's
    experiment trackers out, so that using a trained model needs none of them installed.
    """
    raw = load_config_source(path)
    if not trackers:
        for kind, (section, key) in MULTI_SELECTOR.items():
            if isinstance(raw.get(section), dict):
                raw[section] = {k: v for k, v in raw[section].items() if k != key}
            raw.pop(PLUGIN_SECTION[kind], None)
    training = dict(raw.get("training") or {})
    # Before grad_norm_unit existed, the thresholds and logged norms were on the bits scale.
    # (model.scale_fn needs no entry: its default, softplus, is what every older run used.)
    training.setdefault("grad_norm_unit", "bits")
    raw["training"] = training
    return build_config(raw, registry)


def _none_if_none(value: Any) -> Any:
    # The reference spells "no flow" as the string "none".
    return None if isinstance(value, str) and value.lower() == "none" else value


def build_config(raw: Mapping[str, Any], registry: PluginRegistry | None = None) -> Config:
    """Validate a raw nested mapping into a :class:`Config`."""
    registry = registry or get_registry()
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    known = list(CORE_SECTIONS) + list(PLUGIN_SECTION.values())
    for name, value in raw.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            raise ConfigError(
                f"unknown config section '{name}'",
                hint=f"did you mean '{close[0]}'?" if close else f"sections: {', '.join(known)}",
            )
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"{name}: expected a mapping of options, got {_clip(value)}",
                hint=f"write {name} as 'key: value' lines, or leave it out",
            )
    for section, key in SELECTOR.values():
        if key in (raw.get(section) or {}):
            raw[section][key] = _none_if_none(raw[section][key])

    data = build_section(DataConfig, raw.get("data"), "data", None)
    dataset_spec = registry.get("dataset", data.dataset)
    with dataset_spec.reported("options"):
        dataset_options = build_section(dataset_spec.options, raw.get("dataset"), "dataset", None)
    image_size = sources.image_size(dataset_spec, dataset_options, data)
    num_scales = int(math.log2(image_size)) + 1

    model = build_section(ModelConfig, raw.get("model"), "model", num_scales)
    training = build_section(TrainingConfig, raw.get("training"), "training", num_scales)
    run = build_section(RunConfig, raw.get("run"), "run", num_scales)
    if run.backend is None:
        from hvae_core.backends.select import default_backend

        env = os.environ.get("KERAS_BACKEND") or default_backend()
        run.backend = build_section(RunConfig, {"backend": env}, "KERAS_BACKEND", None).backend
    if model.depthwise:
        if model.block not in ("vdvae", "depthwise"):
            raise ConfigError(
                f"model.depthwise is true but model.block is '{model.block}'",
                hint="drop depthwise, or set block: depthwise",
            )
        model.block = "depthwise"
    if training.cyclic_beta:
        if training.beta_schedule not in ("linear-warmup", "cyclic"):
            raise ConfigError(
                f"training.cyclic_beta is true but training.beta_schedule is "
                f"'{training.beta_schedule}'",
                hint="drop cyclic_beta, or set beta_schedule: cyclic",
            )
        training.beta_schedule = "cyclic"

    sections = {"model": model, "data": data, "training": training, "run": run}
    plugin_options: dict[str, Any] = {"dataset": dataset_options}
    for kind, (section, key) in SELECTOR.items():
        if kind == "dataset":
            continue
        name = getattr(sections[section], key)
        plugin_section = PLUGIN_SECTION[kind]
        if name is None:
            if raw.get(plugin_section):
                raise ConfigError(
                    f"options given in section '{plugin_section}' but no {kind} is chosen",
                    hint=f"choose one with {section}.{key} (or drop the section)",
                )
            continue
        spec = registry.get(kind, name)
        with spec.reported("options"):
            plugin_options[kind] = build_section(
                spec.options, raw.get(plugin_section), plugin_section, num_scales
            )
    for kind, (section, key) in MULTI_SELECTOR.items():
        plugin_options[kind] = _multi_options(
            kind, getattr(sections[section], key), raw, f"{section}.{key}", registry, num_scales
        )
    return Config(
        model=model,
        data=data,
        training=training,
        run=run,
        plugin_options=plugin_options,
        image_size=image_size,
    )


def _multi_options(
    kind: str,
    names: list[str],
    raw: Mapping[str, Any],
    selector: str,
    registry: PluginRegistry,
    num_scales: int,
) -> dict[str, Any]:
    """Name -> options of every chosen plugin of a kind that a run may choose several of."""
    section = PLUGIN_SECTION[kind]
    given = raw.get(section) or {}
    for name, value in given.items():
        if name not in names:
            raise ConfigError(
                f"options given in section '{section}' for {kind} '{name}', which is not chosen",
                hint=f"add it to {selector} (or drop {section}.{name})",
            )
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(
                f"{section}.{name}: expected a mapping of options, got {_clip(value)}",
                hint=f"write {section}.{name} as 'key: value' lines (see 'hvae plugins show "
                f"{kind} {name}'), or leave it empty",
            )
    return {
        name: build_section(
            registry.get(kind, name).options, given.get(name), f"{section}.{name}", num_scales
        )
        for name in names
    }


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (sections added or dropped too)."""
    keys = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        keys += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return keys
