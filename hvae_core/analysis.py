"""What the hierarchy learned, as figures: how much each latent layer is used, what the top
layers encode, and samples across temperatures (``hvae analyze``).

Every figure comes from :class:`~hvae_core.trained.TrainedModel` methods; the ones that need
data (latent usage, conditioned reconstructions) take images, the rest need none.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.model.evaluation import usage_line
from hvae_core.run.files import atomic_write_bytes

USAGE, TOP_DOWN, TEMPERATURES = "latent_usage.png", "top_down.png", "temperatures.png"
TIMES = "scale_times.png"
FIGURES = (USAGE, TOP_DOWN, TEMPERATURES, TIMES)


def depths(num_layers: int, count: int = 7) -> list[int]:
    """A spread of how many top layers to condition on, from 0 (a sample) to all of them."""
    return sorted({int(round(j)) for j in np.linspace(0, num_layers, min(count, num_layers + 1))})


def latent_usage(summary: dict[str, Any], resolutions: Sequence[int], path: Path) -> None:
    """Bars of every layer's KL (bits/dim) and share of active units, coloured by scale."""
    plt = _pyplot()
    layers = np.arange(len(resolutions))
    scales = sorted(set(resolutions))
    colours = {
        r: plt.get_cmap("viridis")(i / max(len(scales) - 1, 1)) for i, r in enumerate(scales)
    }
    bar_colours = [colours[r] for r in resolutions]
    dims = np.maximum(np.asarray(summary["latent_dims"]), 1)
    share = np.asarray(summary["active_units"]) / dims
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.25 * len(layers) + 2), 6))
    top.bar(layers, summary["kl_layers_bpd"], color=bar_colours)
    top.set_ylabel("KL (bits/dim)")
    top.set_title(f"{summary['kl_bpd']:.4f} bits/dim of KL; {usage_line(summary)}")
    bottom.bar(layers, share, color=bar_colours)
    bottom.set_ylabel("active units (share)")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("latent layer (top first)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[r]) for r in scales]
    top.legend(handles, [f"{r}x{r}" for r in scales], title="resolution", fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def image_table(
    columns: Sequence[np.ndarray], titles: Sequence[str], num_bits: int, path: Path, title: str
) -> None:
    """Images as a table: one column per array (N, H, W, C) of uint8 levels, titled."""
    plt = _pyplot()
    rows = len(columns[0])
    size = 1.1
    fig, axes = plt.subplots(
        rows, len(columns), figsize=(size * len(columns), size * rows + 0.6), squeeze=False
    )
    top = 2**num_bits - 1
    for c, (images, name) in enumerate(zip(columns, titles, strict=True)):
        for r in range(rows):
            ax = axes[r][c]
            image = images[r].astype(np.float64) / top
            ax.imshow(
                image[..., 0] if image.shape[-1] == 1 else image,
                cmap="gray",
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize="small")
    fig.suptitle(title, fontsize="medium")
    _save(fig, path)


def write_figures(
    model: Any,
    out: Path,
    images: np.ndarray | None,
    temperatures: Sequence[float],
    temperature: float,
    seed: int,
    num_images: int = 8,
) -> tuple[list[Path], list[str]]:
    """The figures into ``out`` and a text summary. Without ``images`` (no data), only the
    samples across temperatures."""
    written: list[Path] = []
    lines: list[str] = []
    resolutions = model.model.latent_resolutions
    if images is not None:
        summary = model.elbo(images)
        latent_usage(summary, resolutions, out / USAGE)
        written.append(out / USAGE)
        per_scale = ", ".join(
            f"{r}x{r} {kl:.4f}" for r, kl in sorted(summary["kl_scales_bpd"].items())
        )
        lines += [
            f"{summary['images']:,} images: {summary['bpd']:.4f} bits/dim (recon "
            f"{summary['recon_bpd']:.4f}, kl {summary['kl_bpd']:.4f})",
            f"KL per scale (bits/dim): {per_scale}",
            usage_line(summary),
        ]
        shown = images[:num_images]
        columns, titles = [shown], ["data"]
        for j in depths(model.num_latent_layers):
            model.reseed(seed)  # the same prior draws in every column
            columns.append(model.reconstruct(shown, latent_layers=j, temperature=temperature))
            titles.append(f"top {j}")
        image_table(
            columns,
            titles,
            model.num_bits,
            out / TOP_DOWN,
            f"posterior in the top j layers, prior (t = {temperature:g}) below",
        )
        written.append(out / TOP_DOWN)
        from hvae_core.model.pixels import to_unit_range

        batch = images[: model.batch_size]
        times = scale_times(model.model, to_unit_range(batch, model.num_bits))
        scale_times_figure(times, len(batch), out / TIMES)
        written.append(out / TIMES)
        slowest = max(times["decoder"], key=times["decoder"].get)
        lines.append(
            f"eager pass of {len(batch)} images: encoder "
            f"{1000 * sum(times['encoder'].values()):.1f} ms, decoder "
            f"{1000 * sum(times['decoder'].values()):.1f} ms (slowest decoder scale "
            f"{slowest}x{slowest})"
        )
    columns = []
    for t in temperatures:
        model.reseed(seed)  # the same noise, scaled by each temperature
        columns.append(model.sample(num_images, t))
    image_table(
        columns,
        [f"t = {t:g}" for t in temperatures],
        model.num_bits,
        out / TEMPERATURES,
        "samples at prior temperature t",
    )
    written.append(out / TEMPERATURES)
    return written, lines


def scale_times(hvae: Any, x: Any, repeats: int = 3) -> dict[str, dict[int, float]]:
    """Seconds the encoder and the decoder (posterior pass) spend at every resolution on the
    batch ``x``, run eagerly (each scale's output is read back before the clock moves on); the
    best of ``repeats`` passes after one warm-up pass (on JAX every operation compiles on its
    first use)."""
    import keras

    def timed(run: Any) -> dict[int, float]:
        marks: list[tuple[int, float]] = []

        def on_scale(resolution: int, h: Any) -> None:
            keras.ops.convert_to_numpy(h)  # waits for the scale's work
            marks.append((int(resolution), time.perf_counter()))

        start = time.perf_counter()
        run(on_scale)
        times, previous = {}, start
        for resolution, mark in marks:
            times[resolution] = mark - previous
            previous = mark
        return times

    activations = hvae.encoder(x)
    rng = np.random.default_rng(0)  # the noise is an input; its values do not matter here
    noise = [
        rng.standard_normal(s, dtype=np.float32) for s in hvae.noise_shapes(x.shape[0]).latents
    ]
    passes = {
        "encoder": lambda on_scale: hvae.encoder(x, on_scale=on_scale),
        "decoder": lambda on_scale: hvae.decoder(
            activations=activations, batch_size=x.shape[0], noise=noise, on_scale=on_scale
        ),
    }
    out: dict[str, dict[int, float]] = {}
    for name, run in passes.items():
        timed(run)  # warm-up
        trials = [timed(run) for _ in range(repeats)]
        out[name] = {r: min(t[r] for t in trials) for r in trials[0]}
    return out


def scale_times_figure(times: dict[str, dict[int, float]], batch: int, path: Path) -> None:
    plt = _pyplot()
    resolutions = sorted(times["encoder"])
    positions = np.arange(len(resolutions))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, name in ((-0.2, "encoder"), (0.2, "decoder")):
        values = [1000 * times[name].get(r, 0.0) for r in resolutions]
        ax.bar(positions + offset, values, width=0.4, label=name)
    ax.set_xticks(positions, [f"{r}x{r}" for r in resolutions])
    ax.set_ylabel(f"ms per batch of {batch} (eager)")
    ax.set_xlabel("resolution")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
