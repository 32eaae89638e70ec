"""What each plugin kind must provide: the contracts of hvae's public plugin API.

These are structural (``typing.Protocol``): a plugin satisfies one by having the right methods,
without inheriting from anything, so this module imports no Keras and no backend. Tensors below
are the chosen Keras backend's tensors; images are NHWC.

Every kind's registered target is a *factory*, called with the plugin's options instance (the
dataclass it registered, filled from the config section named after its kind; a run may choose
several trackers, so a tracker's options are in ``tracker.NAME``) and the parts of the resolved
config it needs, and returning the object described here. The core passes every argument a
factory's contract lists, by the names it lists (keyword-only ones as keywords), so a factory
needs no defaults and no ``**kwargs``. Plugins import these names from :mod:`hvae_core.api`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

Tensor = Any  # a tensor of the active Keras backend


@runtime_checkable
class Dataset(Protocol):
    """Images of one dataset. Factory: ``(options, data: DataConfig) -> Dataset``.

    The image size (square, a power of two) gives the number of scales. It comes from the
    options' ``image_size`` field where the config sets it, else from the registration info
    ``image_size``. An ``image_size: int | None = None`` option left null means "the images
    say": the config is resolved by opening the dataset and reading ``image_shape`` (once:
    training uses that same object), and the size is written into the option, so a run's
    ``config.yaml`` records it. A configured ``image_size`` that ``image_shape`` contradicts is
    a one-line error. Bit depth always comes from ``num_bits``; ``data.num_bits`` may only
    lower it.
    """

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of every image."""
        ...

    @property
    def num_bits(self) -> int:
        """Bit depth of the pixel values: they lie in ``[0, 2**num_bits - 1]``."""
        ...

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names; ``train`` and ``val`` always, ``test`` where the release has one."""
        ...

    def load(self, split: str) -> np.ndarray:
        """All images of a split as uint8 (N, H, W, C): an array, a read-only memory map, or
        any "image array" (``len``, ``shape``, ``dtype``, ``ndim`` and ``x[index_array]``
        returning a fresh uint8 NHWC array; see :mod:`hvae_core.data`), so that a split of a
        huge file is never read whole."""
        ...

    # Optional: ``transform_batch(batch, rng) -> batch``. The input pipeline applies it to every
    # batch of every split (e.g. MNIST's dynamic binarisation); ``num_bits`` then describes the
    # transformed images.


@runtime_checkable
class PosteriorFlow(Protocol):
    """A flow on the posterior sample of one top-down block.

    Factory: ``(options, model: ModelConfig, *, scale: int, resolution: int, z_width: int,
    name: str) -> PosteriorFlow | None`` (None: no flow at this scale). The block's posterior
    branch grows by ``context_width`` output channels, which become the flow's context.
    """

    context_width: int

    def __call__(
        self, z0: Tensor, context: Tensor, training: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Map z_0 ~ q(z|z<,x), shape (B, H, W, C), conditioned on ``context`` (B, H, W,
        context_width) from the posterior branch, to z_K of the same shape; also return
        sum_k log|det dz_k/dz_(k-1)| per example, shape (B,)."""
        ...


@runtime_checkable
class Attention(Protocol):
    """Attention that lets top-down blocks read from a memory along the hierarchy.

    Factory: ``(options, model: ModelConfig, *, widths: Mapping[int, int], make_block) ->
    Attention`` where ``widths`` maps each resolution to the residual width there and
    ``make_block`` is the model's own :data:`BlockFactory` with its options and dtype policy
    already bound (call it with the keyword arguments only), for plugins that need residual
    blocks of their own. Top-down blocks are numbered from 0 at the top (1x1), in the order
    ``model.dec_num_blocks`` gives, read from its last scale to its first.

    The memory is whatever the plugin likes (a tuple of tensors, say); the core only passes it
    along: from :meth:`encode`, through the optional ``prepare`` before and :meth:`update` after
    every top-down block, into :meth:`read`. If the plugin is a Keras layer, the model tracks
    its weights; layers it calls inside these methods are built on the first forward pass.
    """

    # Optional: ``prepare(state, memory, *, block, resolution) -> memory``, called with the
    # state top-down block ``block`` starts from, before its reads; the memory it returns is
    # what both reads of that block (and then :meth:`update`) receive. It lets work that the
    # prior and posterior reads share, such as the block's queries, be done once.

    def encode(self, activations: Mapping[int, Tensor] | None) -> Any:
        """The memory before the first top-down block, from the encoder's activations
        (resolution -> (B, R, R, width)); None when sampling from the prior."""
        ...

    def read(
        self, state: Tensor, memory: Any, *, block: int, resolution: int, branch: str
    ) -> Tensor:
        """What top-down block ``block`` at ``resolution`` adds to the input of its
        ``branch`` ('prior' or 'posterior'); the result has the state's shape (B, R, R, width)."""
        ...

    def update(self, state: Tensor, memory: Any, *, block: int, resolution: int) -> Any:
        """The memory after top-down block ``block`` produced ``state``."""
        ...


@dataclass(frozen=True, eq=False)
class LayerStats:
    """One latent layer's posterior and prior, for the B images of a batch.

    ``R`` is the layer's resolution and ``Z`` its latent width (``model.z_width`` at that
    scale). Every field is a float32 tensor that gradients flow through.
    """

    kl: Tensor
    """(B,), nats per image: KL(q(z | z_above, x) || p(z | z_above)) summed over the layer's
    R * R * Z dimensions. With a posterior flow, the one-sample estimate
    log q(z_K | x) - log p(z_K) at this pass's draw (which can be negative)."""

    q_mean: Tensor
    """(B, R, R, Z): mean of the Gaussian posterior q(z | z_above, x); with a flow, of the
    flow's base distribution q_0 (the flow's input)."""

    q_scale: Tensor
    """(B, R, R, Z): standard deviation (> 0) of that Gaussian."""

    p_mean: Tensor
    """(B, R, R, Z): mean of the Gaussian prior p(z | z_above)."""

    p_scale: Tensor
    """(B, R, R, Z): standard deviation (> 0) of the prior."""


@dataclass(frozen=True, eq=False)
class ModelOutputs:
    """What one posterior pass of the model gives for a batch ``x`` of B images (H, W, C):
    what :meth:`Regularizer.loss_terms` receives. Latent layers are in top-down order, the top
    (1x1) first; ``latents[l]`` and ``layers[l]`` are the same layer. It exists only inside
    the loss (within the backend's traced step), so its tensors may be symbolic there."""

    params: Tensor
    """(B, H, W, P): the pixel likelihood's raw parameters (a discretized mixture of
    ``model.num_output_mixtures`` = M logistics: P = M + 2 M C + M C (C - 1) / 2), in the
    model's compute dtype (bfloat16 under ``model.precision: mixed_bfloat16``)."""

    latents: tuple[Tensor, ...]
    """Per layer, the posterior sample z, (B, R, R, Z) float32 (with a flow, z_K: after it)."""

    layers: tuple[LayerStats, ...]
    """Per layer, its posterior and prior (see :class:`LayerStats`)."""


@runtime_checkable
class Regularizer(Protocol):
    """A training regularizer. Factory: ``(options, training: TrainingConfig) -> Regularizer``.

    It acts on training steps only; evaluation scores the plain ELBO. Optional attribute
    ``noise_groups`` (default 1): the training batch, and each of its ``batch_size_div``
    micro-batches, consists of that many equal parts that share one draw of the latent noise
    (e.g. images followed by their augmentations). Optional attribute ``batch_groups``
    (default ``noise_groups``): how many equal, row-matched parts each micro-batch has, shared
    noise or not; under data parallelism every replica takes the same rows of each part.
    """

    def transform_batch(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Rewrite a uint8 NHWC batch before the step; the result has the same batch size."""
        ...

    def loss_terms(self, outputs: ModelOutputs, images: Tensor) -> Mapping[str, Tensor]:
        """Named scalar loss terms for a training batch: ``outputs`` is the model's posterior
        pass over ``images`` (B, H, W, C), the batch after :meth:`transform_batch`, as floats
        in [-1, 1]. Each term is in nats per image (a mean over the batch, like the ELBO's
        parts): the core divides it by H * W * C * ln 2 and adds it to the loss, which is in
        bits per dimension, and logs it in bits per dimension under its name (in
        ``metrics.jsonl``: its mean over the epoch's training steps). No name may be one of
        :data:`CORE_METRICS`."""
        ...


@runtime_checkable
class Tracker(Protocol):
    """An experiment tracker: it is shown what the run directory gets, as the run writes it.

    Factory: ``(options, run: RunConfig, *, run_dir: Path) -> Tracker``. It is called only on
    the chief process (process 0) of a kept run (``run.save``), once per training session (a
    new run, or each ``--resume``), before the session's first epoch. ``run_dir`` exists and
    holds ``config.yaml``; a tracker that writes files keeps them in a folder of its own there.
    A factory that cannot make its tracker raises :class:`hvae_core.HvaeError` saying what to
    do: the run then stops with that one line before it trains. Any other exception from the
    factory stops it too, named after the plugin. A missing package is best reported by raising
    ``HvaeError`` (naming what to install) when the implementation's module is imported: that
    happens before the model is built and the run directory is made.

    The core calls the three methods below with positional arguments, in this order: ``start``
    once, ``log_epoch`` after every epoch, ``close`` once, also when the run ends in an error or
    Ctrl-C. If one of them raises an ``Exception``, training goes on (``metrics.jsonl`` always
    has every epoch): one warning line names the tracker, which is not called again in this
    session, ``close`` included.
    """

    def start(self, config: dict[str, Any], first_epoch: int) -> None:
        """The session begins. ``config`` is the resolved configuration as ``config.yaml``
        holds it (section -> option -> value; the tracker's own copy). ``first_epoch`` is the
        first epoch this session logs: 1 for a new run; after ``--resume``, one more than the
        checkpoint's epoch. Whatever an earlier session logged for that epoch and later is void
        (``metrics.jsonl`` drops those rows: the run goes back to its checkpoint)."""
        ...

    def log_epoch(self, row: dict[str, Any], images: dict[str, np.ndarray]) -> None:
        """One finished epoch. ``row`` is the object just appended to ``metrics.jsonl``: JSON
        values (numbers; strings; None for a non-finite number; lists of numbers, such as a
        value per latent layer), ``row["epoch"]`` and ``row["step"]`` saying where the run is.
        ``images`` are the grids written to the run directory after this epoch, by file stem
        (``"samples"``, ``"reconstructions"``): read-only uint8 arrays (H, W, C), C 1 or 3,
        the PNGs' pixels. It is empty after an epoch that wrote none: images are written every
        ``run.images_minutes`` (on a clock), and after the last epoch. ``row`` is the tracker's
        own copy."""
        ...

    def close(self) -> None:
        """The session ends: write out and release what the tracker holds."""
        ...


# The names the core reports, declared once: whoever produces or reads one uses these tuples.
LOSS_TERMS: tuple[str, ...] = ("loss", "elbo_bpd", "recon_bpd", "kl_bpd")
"""The loss and its parts in bits per dimension (``HVAE.losses_for``): a train step's metrics
summed over an epoch."""
MODEL_OUTPUTS: tuple[str, ...] = ("kl_layers_bpd", "kl_flow_bpd", "outputs")
"""What else ``HVAE.losses_for`` returns beside :data:`LOSS_TERMS`."""
STEP_TERMS: tuple[str, ...] = ("grad_norm", "skipped")
"""What the engines add to a train step's metrics."""
EPOCH_COUNTS: tuple[str, ...] = ("count", "norm_count", "grad_norm_max")
"""The trainer's running counts within an epoch (a checkpoint keeps them)."""
ROW_KEYS: tuple[str, ...] = (
    "epoch",
    "step",
    "train_bpd",
    "val_bpd",
    "kl_bpd",
    "recon_bpd",
    "val_kl_bpd",
    "val_recon_bpd",
    "val_kl_layers_bpd",
    "val_kl_scales_bpd",
    "active_units",
    "active_units_total",
    "latent_dims_total",
    "active_layers",
    "lr",
    "beta",
    "grad_norm_max",
    "grad_norm_mean",
    "grad_norm_unit",
    "skipped_updates",
    "seconds",
)
"""The keys of every row of ``metrics.jsonl``, in order (a regularizer's named terms follow)."""

CORE_METRICS: frozenset[str] = frozenset(
    LOSS_TERMS + MODEL_OUTPUTS + STEP_TERMS + EPOCH_COUNTS + ROW_KEYS
)
"""The names the model, the engines and the trainer report. A regularizer's loss term of one of
these names would overwrite a core metric in the logs, so it is an error."""


LrScheduleFactory = Callable[..., Any]
"""``(options, training: TrainingConfig, steps_per_epoch: int) -> float | schedule`` where a
schedule is a ``keras.optimizers.schedules.LearningRateSchedule`` (step -> learning rate)."""

BetaScheduleFactory = Callable[..., Callable[[int], float]]
"""``(options, training: TrainingConfig, steps_per_epoch: int) -> (step -> beta)``."""

BlockFactory = Callable[..., Any]
"""``(options, model: ModelConfig, *, in_width, middle_width, out_width, kernel_size, residual,
last_scale, name, dtype) -> keras.Layer`` mapping (B, H, W, in_width) to (B, H, W, out_width).
``last_scale`` scales the initial weights of the block's last layer (0: zero, so a residual
block starts as the identity); ``dtype`` is the Keras dtype policy the layer must use."""
