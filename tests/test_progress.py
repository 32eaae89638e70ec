"""The progress bar: elapsed time and ETA that fit the terminal; --quiet: log lines."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from hvae_core.training.progress import Figures, Reporter

METRICS = {"elbo_bpd": 3.18234, "loss": 3.2011, "grad_norm": 0.371}


def twelve_steps_of_two_seconds(width: int) -> str:
    """What the bar of epoch 3/100 shows after 12 of its 187 steps, 2 s each (a clock of our
    own), on a terminal ``width`` columns wide."""
    now = [100.0]
    console = Console(
        width=width, file=io.StringIO(), color_system=None, record=True, get_time=lambda: now[0]
    )
    reporter = Reporter(quiet=False, console=console)
    reporter.start_epoch(3, 100, 187, 0)
    for done in range(1, 13):
        now[0] += 2.0
        reporter.step(done, METRICS, 0, 2.0)
    reporter.close()  # a console that is not a terminal gets the bar once, as it stops
    return console.export_text()


@pytest.mark.parametrize("width", [60, 80])
def test_a_narrow_bar_shows_elapsed_time_and_eta_and_fits(width) -> None:
    text = twelve_steps_of_two_seconds(width)
    [line] = text.splitlines()
    assert len(line) <= width, line
    assert "epoch 3/100" in line and "12/187" in line
    assert " 0:00:24 " in line  # elapsed
    assert "eta 0:05:50" in line  # 175 steps left at 2 s each
    assert "bpd 3.182" in line  # the first figure fits; the others give way, whole
    assert "…" not in line and "skips" not in line


def test_a_wide_bar_shows_every_figure() -> None:
    [line] = twelve_steps_of_two_seconds(160).splitlines()
    assert line.endswith("bpd 3.182  loss 3.201  |g| 0.37  skips 0  2000 ms"), line
    assert "0:00:24" in line and "eta 0:05:50" in line


def test_figures_keep_whole_fields_from_the_first() -> None:
    figures = Figures(["bpd 3.182", "loss 3.201", "|g| 0.37"])
    assert figures.fitting(100) == "bpd 3.182  loss 3.201  |g| 0.37"
    assert figures.fitting(21) == "bpd 3.182  loss 3.201"
    assert figures.fitting(20) == "bpd 3.182"
    assert figures.fitting(8) == ""


def test_quiet_prints_log_lines_and_no_bar(capsys) -> None:
    reporter = Reporter(quiet=True)
    reporter.start_epoch(1, 2, 10, 0)
    reporter.step(1, METRICS, 0, 0.5)
    assert reporter.progress is None
    row = {
        "epoch": 1,
        "train_bpd": 3.2,
        "val_bpd": 3.1,
        "kl_bpd": 0.01,
        "lr": 2e-3,
        "beta": 1.0,
        "grad_norm_max": 0.7,
        "grad_norm_unit": "nats",
        "skipped_updates": 0,
        "seconds": 1.5,
    }
    reporter.end_epoch(row)
    out, err = capsys.readouterr()
    assert out == ""
    *steps, last = err.splitlines()
    # A step line at most every 30 s: the first one, unless this machine booted seconds ago.
    assert steps in ([], ["epoch 1 step 1/10: bpd 3.182  loss 3.201  |g| 0.37  skips 0  500 ms"])
    assert last == (
        "epoch 1: train 3.2000 bpd, val 3.1000 bpd (kl 0.0100), lr 2.00e-03, beta 1, "
        "max |g| 0.7 (nats), 0 skipped, 1.5 s"
    )
