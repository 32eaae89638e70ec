"""Options of the first-party attention plugins. Light (dataclasses only): read whenever plugins
are listed, so nothing here imports Keras."""

from __future__ import annotations

from dataclasses import dataclass

from hvae_core.api import ConfigError, option


@dataclass
class DepthwiseAttentionOptions:
    query_width: int = option(
        32,
        "channels of every query and key, at every scale; the values are the residual states "
        "(stage_in_width channels), so keys this narrow add little memory next to them",
    )
    num_queries: int = option(
        1,
        "queries per chain (prior, posterior) in every top-down block; more than 1 reads the "
        "memory that many times and combines the reads with a 1x1 convolution, like the heads "
        "of multi-head attention",
    )

    def validate(self, section: str) -> None:
        for name in ("query_width", "num_queries"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{section}.{name}: expected a value > 0, got {value!r}")
