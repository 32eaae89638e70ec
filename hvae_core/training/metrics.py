"""An epoch's running sums of the train steps' metrics, and the row of ``metrics.jsonl`` they
become. The names are declared once, in :mod:`hvae_core.interfaces`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hvae_core.interfaces import EPOCH_COUNTS, LOSS_TERMS, ROW_KEYS, STEP_TERMS


def accumulate(sums: dict[str, float], metrics: Mapping[str, float]) -> None:
    """Add one train step's ``metrics`` to the epoch's ``sums`` (a checkpoint keeps them). A
    step whose loss is not finite counts for the skipped updates only; its other terms and
    its gradient norm, where finite, are summed as usual."""
    if all(math.isfinite(metrics[k]) for k in LOSS_TERMS):
        for key, value in metrics.items():
            if key not in STEP_TERMS:
                sums[key] = sums.get(key, 0.0) + value
        sums["count"] = sums.get("count", 0) + 1
    norm = metrics["grad_norm"]
    if math.isfinite(norm):
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
        sums["grad_norm_max"] = max(sums.get("grad_norm_max", 0.0), norm)
        sums["norm_count"] = sums.get("norm_count", 0) + 1
    sums["skipped"] = sums.get("skipped", 0) + int(metrics["skipped"] > 0)


def epoch_row(
    sums: Mapping[str, float],
    val: Mapping[str, Any],
    *,
    epoch: int,
    step: int,
    lr: float,
    beta: float,
    grad_norm_unit: str,
    seconds: float,
) -> dict[str, Any]:
    """The row of ``metrics.jsonl`` for a finished epoch: the training sums' means, the
    validation summary ``val`` (see :func:`hvae_core.model.evaluation.summarise`), then a
    regularizer's named terms (their means), in the order of :data:`ROW_KEYS`."""
    count = max(sums.get("count", 0), 1)
    values: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "train_bpd": sums.get("elbo_bpd", math.nan) / count,
        "val_bpd": val.get("elbo_bpd"),
        "kl_bpd": sums.get("kl_bpd", math.nan) / count,
        "recon_bpd": sums.get("recon_bpd", math.nan) / count,
        "val_kl_bpd": val.get("kl_bpd"),
        "val_recon_bpd": val.get("recon_bpd"),
        "val_kl_layers_bpd": val.get("kl_layers_bpd"),
        # By resolution, as JSON keys (strings): the row trackers get is what the file holds.
        "val_kl_scales_bpd": {str(r): kl for r, kl in val.get("kl_scales_bpd", {}).items()} or None,
        "active_units": val.get("active_units"),
        "active_units_total": val.get("active_units_total"),
        "latent_dims_total": val.get("latent_dims_total"),
        "active_layers": val.get("active_layers"),
        "lr": lr,
        "beta": beta,
        "grad_norm_max": sums.get("grad_norm_max", math.nan),
        "grad_norm_mean": sums.get("grad_norm", math.nan) / max(sums.get("norm_count", 0), 1),
        "grad_norm_unit": grad_norm_unit,
        "skipped_updates": int(sums.get("skipped", 0)),
        "seconds": seconds,
    }
    row = {key: values[key] for key in ROW_KEYS}
    own = set(LOSS_TERMS) | set(STEP_TERMS) | set(EPOCH_COUNTS)
    for key in sums:
        if key not in row and key not in own:
            row[key] = sums[key] / count  # a regularizer's named terms
    return row
