"""Per-scale layout of the hierarchy: widths, block counts and kernel sizes by resolution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def kernel_size(resolution: int, increase: bool) -> int:
    """VDVAE uses 1x1 convolutions at resolutions <= 2 (a 3x3 there sees mostly padding);
    ``increase_kernelsize`` grows the kernel at large resolutions."""
    if resolution <= 2:
        return 1
    if increase:
        return 3 if resolution <= 16 else 5 if resolution <= 32 else 7
    return 3


@dataclass(frozen=True)
class Scale:
    index: int  # position in the per-scale lists (0: the largest)
    resolution: int
    width: int
    enc_middle_width: int
    dec_middle_width: int
    z_width: int
    enc_blocks: int
    dec_blocks: int
    kernel_size: int


def scales(model: Any, resolutions: list[int]) -> list[Scale]:
    """One :class:`Scale` per resolution, largest first, from the model config."""
    return [
        Scale(
            index=i,
            resolution=res,
            width=model.stage_in_width[i],
            enc_middle_width=model.enc_middle_width[i],
            dec_middle_width=model.dec_middle_width[i],
            z_width=model.z_width[i],
            enc_blocks=model.enc_num_blocks[i],
            dec_blocks=model.dec_num_blocks[i],
            kernel_size=kernel_size(res, model.increase_kernelsize),
        )
        for i, res in enumerate(resolutions)
    ]
