"""What an evaluation reports, from the sums the model's evaluation pass returns per batch.

:meth:`HVAE.evaluation_terms <hvae_core.model.hvae.HVAE.evaluation_terms>` gives, for a batch,
sums over its images; they add up over batches (:func:`add_terms`), and :func:`summarise` turns
the totals into means, the KL of every latent layer and scale, and the active units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Burda et al. (2016): a latent dimension is active when the variance over images of its
# posterior mean exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01

MEAN_SUM, SQUARE_SUM = "posterior_mean_sum", "posterior_mean_square_sum"


def add_terms(totals: dict[str, Any], terms: dict[str, Any]) -> dict[str, Any]:
    """``totals`` plus one batch's ``terms`` (numpy values, lists of them for per-layer
    arrays), summed in float64."""
    for key, value in terms.items():
        if isinstance(value, list | tuple):
            parts = [np.asarray(v, np.float64) for v in value]
            old = totals.get(key)
            totals[key] = parts if old is None else [a + b for a, b in zip(old, parts, strict=True)]
        else:
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    return totals


def summarise(totals: dict[str, Any], resolutions: Sequence[int]) -> dict[str, Any]:
    """Means over the images counted in ``totals``; ``resolutions``: every latent layer's, top
    first. Keys: ``elbo_bpd``, ``recon_bpd``, ``kl_bpd`` (and ``kl_flow_bpd`` with flows),
    ``kl_layers_bpd`` (per layer; they sum to ``kl_bpd``), ``kl_scales_bpd`` (resolution ->
    sum of its layers), ``active_units`` and ``latent_dims`` (per layer), their totals
    ``active_units_total`` and ``latent_dims_total``, ``active_layers`` (layers with an active
    unit) and ``images``."""
    count = float(totals["count"])
    out: dict[str, Any] = {
        key: float(totals[key] / count)
        for key in ("elbo_bpd", "recon_bpd", "kl_bpd", "kl_flow_bpd")
        if key in totals
    }
    layers = [float(v) for v in np.asarray(totals["kl_layers_bpd"]) / count]
    out["kl_layers_bpd"] = layers
    scales: dict[int, float] = {}
    for resolution, kl in zip(resolutions, layers, strict=True):
        scales[int(resolution)] = scales.get(int(resolution), 0.0) + kl
    out["kl_scales_bpd"] = scales
    active = [
        int(np.count_nonzero(variance > ACTIVE_UNIT_THRESHOLD))
        for variance in posterior_mean_variances(totals)
    ]
    out["active_units"] = active
    out["latent_dims"] = [int(np.size(s)) for s in totals[MEAN_SUM]]
    out["active_units_total"] = sum(active)
    out["latent_dims_total"] = sum(out["latent_dims"])
    out["active_layers"] = sum(1 for a in active if a > 0)
    out["images"] = int(count)
    return out


def posterior_mean_variances(totals: dict[str, Any]) -> list[np.ndarray]:
    """Per layer, the variance over images of every dimension's posterior mean."""
    count = float(totals["count"])
    return [
        np.maximum(square / count - (mean / count) ** 2, 0.0)
        for mean, square in zip(totals[MEAN_SUM], totals[SQUARE_SUM], strict=True)
    ]


def usage_line(summary: dict[str, Any]) -> str:
    """``active 312/1,840 dims in 27/43 layers``."""
    return (
        f"active {summary['active_units_total']:,}/{summary['latent_dims_total']:,} dims in "
        f"{summary['active_layers']}/{len(summary['active_units'])} layers"
    )
