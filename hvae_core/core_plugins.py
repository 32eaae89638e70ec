"""The core's own plugins, registered through the same hooks as any installed package."""

from __future__ import annotations

from hvae_core.hookspecs import Register, hookimpl
from hvae_core.schedules import WarmupOptions


@hookimpl
def register_blocks(register: Register) -> None:
    register(
        "vdvae",
        "hvae_core.model.blocks:vdvae_block",
        summary="VDVAE residual bottleneck block: 1x1 -> 3x3 -> 3x3 -> 1x1, pre-activation",
    )
    register(
        "depthwise",
        "hvae_core.model.blocks:depthwise_block",
        summary="bottleneck block with 5x5 depthwise middle convolutions (NVAE-style)",
    )


@hookimpl
def register_lr_schedules(register: Register) -> None:
    register("constant", "hvae_core.schedules:constant_lr", summary="constant learning rate")
    register(
        "linear-warmup",
        "hvae_core.schedules:linear_warmup_lr",
        options=WarmupOptions,
        summary="linear warm-up from 0, then constant (VDVAE)",
    )
    register(
        "cosd",
        "hvae_core.schedules:cosine_decay_lr",
        options=WarmupOptions,
        summary="linear warm-up, then cosine decay to learning_rate_end",
    )


@hookimpl
def register_beta_schedules(register: Register) -> None:
    register("constant", "hvae_core.schedules:constant_beta", summary="constant beta")
    register(
        "linear-warmup",
        "hvae_core.schedules:linear_warmup_beta",
        summary="beta rises linearly from 0 over beta_warmup_epochs",
    )
    register(
        "cyclic",
        "hvae_core.schedules:cyclic_beta",
        summary="cyclic beta: number_cycles cycles of rise and hold",
    )
