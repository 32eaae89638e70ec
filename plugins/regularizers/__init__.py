"""First-party regularizers. Light: the implementations are imported only when training uses
one, so listing plugins loads no Keras."""

from __future__ import annotations

from hvae_core import hookimpl

from .options import CrVaeOptions


@hookimpl
def register_regularizers(register):  # noqa: ANN001 - the hook's register callable
    register(
        "cr-vae",
        "hvae_plugins.regularizers.cr_vae:make_cr_vae",
        options=CrVaeOptions,
        summary="CR-VAE consistency regularization (Sinha & Dieng 2021) over all latent layers",
    )
