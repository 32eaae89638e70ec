"""Options of the first-party regularizers. Light (dataclasses only): read whenever plugins are
listed, so nothing here imports Keras or NumPy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hvae_core.api import ConfigError, option


@dataclass
class CrVaeOptions:
    cr_lambda: float = option(
        0.1,
        "weight of the consistency term: cr_lambda * sum over latent layers of "
        "KL(q(z|augmented) || q(z|original)), nats per pair, added to the per-image loss",
    )
    cr_duplicate_noise: bool = option(
        True,
        "give an image and its augmentation the same reparameterisation noise, so that their "
        "paths down the hierarchy differ only through the encoder",
    )
    cr_max_shift: int = option(
        1,
        "largest translation in pixels, drawn uniformly per image and axis from "
        "[-cr_max_shift, cr_max_shift] (0: no translation)",
    )
    cr_padding: Literal["edge", "reflect", "constant"] = option(
        "edge",
        "how pixels shifted in at the border are filled: repeat the edge, mirror the image, "
        "or level 0",
    )
    cr_flip: bool = option(
        True,
        "mirror each augmented image left-right with probability 1/2 (turn off for data "
        "whose mirror image means something else, such as digits or text)",
    )

    def validate(self, section: str) -> None:
        if self.cr_lambda < 0:
            raise ConfigError(
                f"{section}.cr_lambda: expected a number >= 0, got {self.cr_lambda}",
                hint="the consistency term is a penalty; 0 switches it off",
            )
        if self.cr_max_shift < 0:
            raise ConfigError(
                f"{section}.cr_max_shift: expected a number of pixels >= 0, got {self.cr_max_shift}"
            )
