"""First-party posterior flows. Light: the implementations are imported only when a model is
built with ``--flow``."""

from __future__ import annotations

from hvae_core import hookimpl

from .options import ConvSylvesterOptions, OrthogonalSylvesterOptions


@hookimpl
def register_flows(register):  # noqa: ANN001 - the hook's register callable
    register(
        "orthogonal-sylvester",
        "hvae_plugins.flows.orthogonal_sylvester:make_orthogonal_sylvester_flow",
        options=OrthogonalSylvesterOptions,
        summary="orthogonal Sylvester flows on the flattened latent, amortised "
        "(van den Berg et al. 2018)",
    )
    register(
        "conv-sylvester",
        "hvae_plugins.flows.conv_sylvester:make_conv_sylvester_flow",
        options=ConvSylvesterOptions,
        summary="generalized convolutional Sylvester flows with the convolution exponential "
        "(Hoogeboom et al. 2020)",
    )
