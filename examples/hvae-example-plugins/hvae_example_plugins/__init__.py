"""Registrations only: this module is imported whenever plugins are listed, so no Keras here."""

from __future__ import annotations

from dataclasses import dataclass

import hvae_core as hvae


@dataclass
class NpyOptions:
    file: str = hvae.option("images.npy", "file in the data directory: uint8 (N, H, W, C)")
    image_size: int | None = hvae.option(
        None, "height and width of the images in the file (a check); null: the file's"
    )
    val_fraction: float = hvae.option(0.1, "fraction of the images held out for validation")
    test_fraction: float = hvae.option(0.1, "fraction of the images held out for testing")
    num_bits: int = hvae.option(8, "bit depth of the pixel values")


@dataclass
class CsvOptions:
    file: str = hvae.option("metrics.csv", "CSV file in the run directory")


@dataclass
class PlanarOptions:
    num_flows: list[int] = hvae.per_scale([1], "planar flow layers per top-down block")


@hvae.hookimpl
def register_datasets(register):  # noqa: ANN001
    register(
        "example-npy",
        "hvae_example_plugins.npy:NpyDataset",
        options=NpyOptions,
        summary="images from one .npy file (example plugin)",
    )


@hvae.hookimpl
def register_flows(register):  # noqa: ANN001
    register(
        "example-planar",
        "hvae_example_plugins.planar:make_planar_flow",
        options=PlanarOptions,
        summary="planar flows on the flattened latent (example plugin)",
    )


@hvae.hookimpl
def register_trackers(register):  # noqa: ANN001
    register(
        "example-csv",
        "hvae_example_plugins.csv_tracker:CsvTracker",
        options=CsvOptions,
        summary="every epoch's numbers as a row of RUN_DIR/metrics.csv (example plugin)",
    )


@hvae.hookimpl
def register_commands(cli):  # noqa: ANN001 - a click.Group
    import click

    @cli.command("example-summary")
    @click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
    def example_summary(run_dir: str) -> None:
        """One line per epoch of a run: epoch, train and val bits/dim (example plugin)."""
        import json
        from pathlib import Path

        metrics = Path(run_dir) / "metrics.jsonl"
        if not metrics.is_file():
            raise hvae.HvaeError(f"{run_dir} has no metrics.jsonl", hint="give a run directory")
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            click.echo(f"{row['epoch']} {row['train_bpd']:.4f} {row['val_bpd']:.4f}")
