"""First-party attention plugins. Light: the implementation is imported only when a model is
built with it, so listing plugins loads no Keras."""

from __future__ import annotations

from hvae_core import hookimpl

from .options import DepthwiseAttentionOptions


@hookimpl
def register_attention(register):  # noqa: ANN001 - the hook's register callable
    register(
        "depthwise",
        "hvae_plugins.attention.depthwise:make_depthwise_attention",
        options=DepthwiseAttentionOptions,
        summary="DAVI-style attention over the depth (layer) axis at every pixel, both chains",
    )
