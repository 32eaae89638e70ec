"""CR-VAE: consistency regularization (Sinha & Dieng 2021) for the whole latent hierarchy.

Every training batch becomes pairs: half the configured batch size of original images and,
after them, an augmented copy of each (small integer translations and left-right flips, see
:mod:`hvae_plugins.regularizers.augment`). Both halves are scored by the usual ELBO, and the
loss gains, per pair,

    cr_lambda * sum_l KL( q(z_l | z_<l, t(x)) || q(z_l | z_<l, x) )

summed over every top-down layer l and averaged over the pairs: the posterior of the augmented
image is pulled towards the posterior of the original (the direction of the paper's R(x, phi)),
and gradients reach both halves. The core logs it under :data:`TERM` in bits per dimension.

Scale: the core's loss is a mean over the images of the batch, i.e. half the sum of the two
ELBOs of a pair, so ``cr_lambda`` here is the paper's lambda divided by two.

With a posterior flow the term compares the Gaussian base posteriors q_0 (``q_mean`` and
``q_scale``, before the flow): the KL between two flowed posteriors has no closed form, and the
flow itself is shared by both images; only its context input differs between them.

With ``cr_duplicate_noise`` (the default, an addition of the reference code base, not of the
paper) the model draws one reparameterisation noise for the originals and repeats it for their
augmentations, so the deeper layers of a pair see latents that differ only through the encoder.
For that the regularizer declares ``noise_groups = 2``: the model draws the noise for the first
half of every micro-batch and repeats it for the second. The engine cuts the batch into
``batch_size_div`` consecutive micro-batches, so :meth:`CrVaeRegularizer.transform_batch` lays
the batch out as that many chunks, each ``[originals_k; augmented(originals_k)]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from hvae_core.api import (
    ConfigError,
    HvaeError,
    LayerStats,
    ModelOutputs,
    gaussian_kl,
    sum_per_example,
)

from .augment import translate_and_flip
from .options import CrVaeOptions

TERM = "consistency_bpd"
"""The name the consistency term is added to the loss and logged under (metrics.jsonl)."""


def consistency_kl(layers: Sequence[LayerStats]) -> Any:
    """Per pair, sum over layers of KL(q(z|t(x)) || q(z|x)), shape (B/2,), in nats; ``layers``
    are the model's per-layer statistics of a batch ``[originals; augmentations]``."""
    total = None
    for layer in layers:
        mean, scale = layer.q_mean, layer.q_scale
        half = ops.shape(mean)[0] // 2
        kl = sum_per_example(gaussian_kl(mean[half:], scale[half:], mean[:half], scale[:half]))
        total = kl if total is None else total + kl
    if total is None:
        raise ValueError("the model has no latent layers to regularize")
    return total


class CrVaeRegularizer:
    """The CR-VAE regularizer of one training run (see the module's docstring)."""

    def __init__(self, options: CrVaeOptions, batch_size: int, batch_size_div: int) -> None:
        self.options = options
        self.cr_lambda = float(options.cr_lambda)
        self.batch_size = batch_size
        self.batch_size_div = batch_size_div
        self.noise_groups = 2 if options.cr_duplicate_noise else 1
        # Every micro-batch is [originals; augmentations], row-matched, with or without
        # shared noise: a data-parallel replica must get both halves of its pairs.
        self.batch_groups = 2
        check_batch_size(batch_size, batch_size_div)

    def augment(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        o = self.options
        return translate_and_flip(
            images, rng, max_shift=o.cr_max_shift, padding=o.cr_padding, flip=o.cr_flip
        )

    def transform_batch(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The first half of ``images`` and its augmentations, as ``batch_size_div`` chunks of
        ``[originals_k; augmented_k]``; the second half of ``images`` is not used."""
        n, div = len(images), self.batch_size_div
        if n % (2 * div):
            raise HvaeError(
                f"cr-vae got a batch of {n} images, which does not split into "
                f"{div} micro-batches of pairs",
                hint="use a batch size divisible by 2 * training.batch_size_div",
            )
        originals = np.asarray(images[: n // 2])
        augmented = self.augment(originals, rng)
        chunks = zip(np.split(originals, div), np.split(augmented, div), strict=True)
        return np.concatenate([part for pair in chunks for part in pair])

    def loss_terms(self, outputs: ModelOutputs, images: Any) -> dict[str, Any]:
        # Nats per pair; the core divides by H*W*C*ln 2 and adds it to the per-image mean loss.
        return {TERM: self.cr_lambda * ops.mean(consistency_kl(outputs.layers))}


def check_batch_size(batch_size: int, batch_size_div: int) -> None:
    """Every micro-batch must hold whole (original, augmented) pairs."""
    micro = batch_size // batch_size_div
    if micro % 2:
        where = (
            f"training.batch_size {batch_size}"
            if batch_size_div == 1
            else f"the micro-batch of {micro} (training.batch_size {batch_size} / "
            f"training.batch_size_div {batch_size_div})"
        )
        raise ConfigError(
            f"cr-vae pairs every image with its augmentation, but {where} is odd",
            hint="use a batch size divisible by 2 * training.batch_size_div",
        )


def make_cr_vae(options: CrVaeOptions, training: Any) -> CrVaeRegularizer:
    """The regularizer factory registered as ``cr-vae``."""
    return CrVaeRegularizer(options, training.batch_size, training.batch_size_div)
