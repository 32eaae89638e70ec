"""The ``hvae`` command line. User errors end as one line with a hint and a non-zero exit."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hvae_core import __version__
from hvae_core.errors import HvaeError, NotAvailableError
from hvae_core.hookspecs import KINDS

BACKENDS = ("tensorflow", "jax", "torch")


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class HvaeGroup(click.Group):
    """A click group that reports every user error as one line instead of a traceback."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        extra.pop("standalone_mode", None)
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except HvaeError as exc:
            _fail(exc.one_line(), exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "hvae"
            _fail(f"{exc.format_message()} (hint: see '{where} --help')", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        sys.exit(result if isinstance(result, int) else 0)


def _warn_failures() -> None:
    from hvae_core.plugins import get_registry

    for failure in get_registry().failures:
        click.echo(f"warning: {failure.one_line()}", err=True)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Piped output would wrap at 80 columns; keep one row per line for grep and friends.
    return console if console.is_terminal else Console(width=200)


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that feed the config, shared by the commands that build one."""
    decorators = [
        click.option(
            "--config",
            "config",
            metavar="PRESET|FILE",
            help="a preset name (e.g. cifar10) or a YAML file",
        ),
        click.option("--dataset", metavar="NAME", help="dataset plugin (data.dataset)"),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False),
            help="folder holding the dataset files (data.data_dir)",
        ),
        click.option("--flow", metavar="NAME", help="posterior flow plugin, or none (model.flow)"),
        click.option(
            "--attention", metavar="NAME", help="attention plugin, or none (model.attention)"
        ),
        click.option(
            "--regularizer",
            metavar="NAME",
            help="regularizer plugin, or none (training.regularizer)",
        ),
        click.option(
            "--backend",
            type=click.Choice(BACKENDS),
            help="Keras backend (run.backend; default $KERAS_BACKEND or tensorflow)",
        ),
        click.option("--epochs", type=click.IntRange(min=0), help="training.epochs"),
        click.option("--batch-size", type=click.IntRange(min=1), help="training.batch_size"),
        click.option("--seed", type=int, help="training.seed"),
        click.option("--save-dir", type=click.Path(file_okay=False), help="run.save_dir"),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="override any option; the value is YAML (repeatable)",
        ),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def _resolve(config: str | None, overrides: tuple[str, ...], **flags: Any) -> Any:
    from hvae_core.config import resolve_config

    return resolve_config(config, flags, overrides)


def _run_dir_config(run_dir: str) -> Any:
    from hvae_core.config import resolve_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise HvaeError(
            f"{run_dir} is not a run directory (no config.yaml)",
            hint="give a directory that 'hvae train' created",
        )
    return resolve_config(path)


@click.group(cls=HvaeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="hvae")
def cli() -> None:
    """hvae: train, evaluate and sample hierarchical VAEs on images (Keras 3)."""


@cli.group()
def plugins() -> None:
    """List installed plugins and their options."""


@plugins.command("list")
@click.option("--kind", type=click.Choice(KINDS), help="only this kind")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins_list(kind: str | None, as_json: bool) -> None:
    """Every installed plugin: kind, name, package, version, summary."""
    from hvae_core.plugins import get_registry

    specs = get_registry().all(kind)
    _warn_failures()
    if as_json:
        click.echo(json.dumps([s.as_row() for s in specs], indent=2))
        return
    from rich.table import Table

    table = Table("kind", "name", "package", "version", "summary", box=None, pad_edge=False)
    for spec in specs:
        table.add_row(spec.kind, spec.name, spec.package, spec.version, spec.summary)
    _console().print(table)


@plugins.command("show")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins_show(kind: str, name: str, as_json: bool) -> None:
    """The options of one plugin, with their defaults and help."""
    from hvae_core.config import PLUGIN_SECTION
    from hvae_core.options import describe_options
    from hvae_core.plugins import get_registry

    spec = get_registry().get(kind, name)
    options = describe_options(spec.options)
    section = PLUGIN_SECTION[kind]
    if as_json:
        row = spec.as_row() | {"section": section, "options": [vars(o) for o in options]}
        click.echo(json.dumps(row, indent=2, default=str))
        return
    click.echo(f"{spec.kind} {spec.name} ({spec.package} {spec.version}): {spec.summary}")
    if not options:
        click.echo("no options")
        return
    from rich.table import Table

    table = Table("option", "type", "default", "help", box=None, pad_edge=False)
    for o in options:
        kind_of = f"{o.type} (per scale)" if o.per_scale else o.type
        table.add_row(f"{section}.{o.name}", kind_of, json.dumps(o.default), o.help)
    _console().print(table)


@cli.group("config")
def config_group() -> None:
    """Inspect configurations."""


@config_group.command("show")
@config_options
def config_show(config: str | None, overrides: tuple[str, ...], **flags: Any) -> None:
    """Print the fully resolved configuration as YAML."""
    click.echo(_resolve(config, overrides, **flags).to_yaml(), nl=False)


@config_group.command("presets")
def config_presets() -> None:
    """List the presets shipped with hvae."""
    from hvae_core.config import preset_names

    for name in preset_names():
        click.echo(name)


@cli.command()
@config_options
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    metavar="RUN_DIR",
    help="continue the run in RUN_DIR where it stopped",
)
@click.option("--quiet", is_flag=True, help="log lines instead of progress bars")
def train(
    config: str | None, overrides: tuple[str, ...], resume: str | None, quiet: bool, **flags: Any
) -> None:
    """Train an HVAE; writes a run directory under run.save_dir."""
    if resume is not None:
        _run_dir_config(resume)
    else:
        _resolve(config, overrides, **flags)
    raise NotAvailableError(
        f"training is not available yet in hvae {__version__}",
        hint="'hvae config show' prints the configuration a run would use",
    )


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True, help="dataset split to evaluate")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="a checkpoint of the run")
@click.option("--batch-size", type=click.IntRange(min=1), help="evaluation batch size")
@click.option("--data-dir", type=click.Path(file_okay=False), help="folder of the dataset files")
@click.option("--backend", type=click.Choice(BACKENDS), help="Keras backend")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--quiet", is_flag=True, help="no progress bar")
def evaluate(run_dir: str, **options: Any) -> None:
    """Bits per dimension of a trained run on a split (EMA weights)."""
    _run_dir_config(run_dir)
    raise NotAvailableError(f"evaluation is not available yet in hvae {__version__}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--n",
    "num",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="number of samples",
)
@click.option(
    "--temperature",
    type=str,
    default="1.0",
    show_default=True,
    help="one temperature, or one per top-down block, comma-separated",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="samples.png",
    show_default=True,
    help="PNG grid to write",
)
@click.option("--npz", type=click.Path(dir_okay=False), help="also write the raw samples")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="a checkpoint of the run")
@click.option("--seed", type=int, help="sampling seed")
@click.option("--backend", type=click.Choice(BACKENDS), help="Keras backend")
@click.option("--quiet", is_flag=True, help="no progress output")
def sample(run_dir: str, **options: Any) -> None:
    """Draw samples from a trained run (EMA weights)."""
    _run_dir_config(run_dir)
    raise NotAvailableError(f"sampling is not available yet in hvae {__version__}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="hvae")
