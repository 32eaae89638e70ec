"""Options of the first-party posterior flows. Light (dataclasses only): read whenever plugins
are listed, so nothing here imports Keras."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hvae_core.api import ConfigError, option, per_scale

MAX_RESOLUTION_HELP = (
    "flows only at scales whose resolution is at most this (null: at every scale); "
    "num_flows still applies below it"
)


def _check(section: str, name: str, values: list[int] | int | None, low: int) -> None:
    items = values if isinstance(values, list) else [values]
    if any(v is not None and v < low for v in items):
        raise ConfigError(f"{section}.{name}: expected values >= {low}, got {values!r}")


@dataclass
class OrthogonalSylvesterOptions:
    num_flows: list[int] = per_scale(
        [4], "orthogonal Sylvester layers per top-down block (0: no flow at that scale)"
    )
    flow_in_ch: list[int] = per_scale(
        [4],
        "context channels the posterior branch adds for the flow; the flow's Q, R, R~ and b "
        "are computed from them (amortised)",
    )
    num_ortho_vecs: list[int] = per_scale(
        [8],
        "orthonormal columns M of Q (capped at the latent's size H*W*C); R and R~ are MxM",
    )
    max_resolution: int | None = option(
        8,
        MAX_RESOLUTION_HELP + "; the default keeps these fully connected flows off the large "
        "scales, where their parameters would outgrow the model",
    )

    def validate(self, section: str) -> None:
        _check(section, "num_flows", self.num_flows, 0)
        _check(section, "flow_in_ch", self.flow_in_ch, 1)
        _check(section, "num_ortho_vecs", self.num_ortho_vecs, 1)
        _check(section, "max_resolution", self.max_resolution, 1)


@dataclass
class ConvSylvesterOptions:
    num_flows: list[int] = per_scale(
        [1],
        "convolutional Sylvester flows per top-down block, chained (0: no flow at that scale; "
        "each is the whole multi-stage flow below)",
    )
    flow_in_ch: list[int] = per_scale(
        [4],
        "context channels the posterior branch adds for the flow; they condition the "
        "autoregressive network of every Sylvester layer (0: an unconditional flow)",
    )
    convsylv_channels: list[int] = per_scale(
        [32], "hidden channels of the masked autoregressive network in each Sylvester layer"
    )
    convsylv_flows_per_stage: list[int] = per_scale(
        [1], "ActNorm -> Sylvester -> flip steps per stage (between two squeeze-and-splits)"
    )
    convsylv_splitfirst: list[bool] = per_scale(
        [False],
        "squeeze and split before the first stage too (Hoogeboom's squeeze_first), so every "
        "Sylvester layer works on a squeezed latent",
    )
    convsylv_stage_limit: list[int] = per_scale(
        [2],
        "most squeeze-and-split steps (each halves the resolution, quadruples the channels "
        "and sets half of them aside unchanged); fewer where the resolution runs out",
    )
    spectral_norm: bool = option(
        False,
        "spectrally normalise the autoregressive network's masked convolutions (one power "
        "iteration per training step, Lipschitz <= 1 per layer); the convolution "
        "exponential's kernel is always norm-bounded, which is what keeps its log-det exact",
    )
    max_resolution: int | None = option(
        16,
        MAX_RESOLUTION_HELP + "; the default leaves out the 32x32 and larger scales, where "
        "these flows would about double the top-down pass's work",
    )

    def validate(self, section: str) -> None:
        _check(section, "num_flows", self.num_flows, 0)
        _check(section, "flow_in_ch", self.flow_in_ch, 0)
        _check(section, "convsylv_channels", self.convsylv_channels, 1)
        _check(section, "convsylv_flows_per_stage", self.convsylv_flows_per_stage, 1)
        _check(section, "convsylv_stage_limit", self.convsylv_stage_limit, 0)
        _check(section, "max_resolution", self.max_resolution, 1)


def flows_at(options: Any, scale: int, resolution: int) -> int:
    """How many flows a top-down block at ``scale`` gets: ``num_flows`` there, or 0 above
    ``max_resolution``."""
    limit = options.max_resolution
    return 0 if limit is not None and resolution > limit else int(options.num_flows[scale])
