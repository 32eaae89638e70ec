"""The ``hvae`` command line. User errors end as one line with a hint and a non-zero exit."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hvae_core import __version__
from hvae_core.backends import parallel as parallel_env
from hvae_core.backends.native_logs import LOG_LEVEL_ENV
from hvae_core.backends.select import BACKENDS, INFERENCE_BACKENDS
from hvae_core.errors import DEBUG_ENV, ConfigError, HvaeError, debug_requested
from hvae_core.export_formats import CONVERTING_BACKEND, PORTABLE, STEMS, check_format
from hvae_core.export_formats import FORMATS as EXPORT_FORMATS
from hvae_core.hookspecs import KINDS

# Work one command does, beyond which it is refused before it starts: the limits of the
# trained model's methods, checked before the run loads.
from hvae_core.trained import MAX_IW_SAMPLES, MAX_SAMPLES
from hvae_core.vdvae_import import PRESETS as VDVAE_PRESETS


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses NaN and infinity, which click's lets through."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# NumPy's and the backends' seeds are unsigned 32-bit integers.
SEED = click.IntRange(0, 2**32 - 1)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class HvaeGroup(click.Group):
    """A click group that reports every user error as one line instead of a traceback
    (``--debug`` or ``HVAE_DEBUG=1``: the traceback too, for plugin authors)."""

    debug = False  # set by --debug, for one invocation

    def list_commands(self, ctx: click.Context) -> list[str]:
        core = super().list_commands(ctx)
        if self is not cli:
            return core
        return sorted([*core, *_plugin_commands(core)])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None or self is not cli:
            return command
        return _plugin_commands(super().list_commands(ctx)).get(name)

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        extra.pop("standalone_mode", None)
        self.debug = False
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except HvaeError as exc:
            if self.debug or debug_requested():
                traceback.print_exception(exc)
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


def _plugin_commands(reserved: list[str]) -> dict[str, click.Command]:
    """The subcommands plugin packages add (``register_commands``); what went wrong adding
    them is warned about once."""
    from hvae_core.plugins import get_registry

    registry = get_registry()
    if not registry.commands_added:
        failures, warnings = len(registry.failures), len(registry.warnings)
        commands = registry.commands(reserved)
        for failure in registry.failures[failures:]:
            click.echo(f"warning: {failure.one_line()}", err=True)
        for warning in registry.warnings[warnings:]:
            click.echo(f"warning: {warning}", err=True)
        return commands
    return registry.commands(reserved)


def _warn_failures() -> None:
    from hvae_core.plugins import get_registry

    for problem in get_registry().problems():
        click.echo(f"warning: {problem}", err=True)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Piped output would wrap at 80 columns; keep one row per line for grep and friends.
    return console if console.is_terminal else Console(width=200)


def verbose_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--verbose, for the commands that start a backend."""
    return click.option(
        "--verbose",
        is_flag=True,
        help="show everything TensorFlow and JAX/XLA log (default: hide their native log "
        f"lines; also ${LOG_LEVEL_ENV}=verbose)",
    )(func)


def _check_use(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    from hvae_core.config import parse_use

    for item in values:
        parse_use(item)  # a mistake is a one-line ConfigError listing the kinds
    return values or None  # None: not given (a resume without flags keeps its config)


def loaded_run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--checkpoint, --backend and --verbose: the commands that load a trained run."""
    decorators = [
        click.option(
            "--checkpoint", type=click.Path(dir_okay=False), help="a checkpoint of the run"
        ),
        click.option(
            "--backend",
            type=click.Choice(BACKENDS + tuple(INFERENCE_BACKENDS)),
            help="Keras backend (openvino: Keras' inference-only OpenVINO backend)",
        ),
        verbose_option,
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


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
            "--use",
            multiple=True,
            metavar="KIND=NAME",
            callback=_check_use,
            help="choose the plugin of a kind (repeatable; kinds: "
            f"{', '.join(k for k in KINDS if k != 'tracker')}; trackers: --tracker), e.g. "
            "--use block=depthwise --use lr-schedule=constant",
        ),
        click.option(
            "--tracker",
            metavar="NAME",
            multiple=True,
            # Not given: None, so that the config's own run.trackers stands.
            callback=lambda ctx, param, value: list(value) or None,
            help="experiment tracker plugin (repeatable; replaces run.trackers; "
            "metrics.jsonl is always written)",
        ),
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


@click.group(cls=HvaeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="hvae")
@click.option(
    "--debug",
    is_flag=True,
    help=f"on an error, print the full traceback too (for plugin authors; also ${DEBUG_ENV}=1)",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """hvae: train, evaluate and sample hierarchical VAEs on images (Keras 3)."""
    if debug:
        ctx.command.debug = True  # type: ignore[attr-defined]  # read by HvaeGroup.main


@cli.group()
def plugins() -> None:
    """List installed plugins and their options."""


@plugins.command("list")
@click.option("--kind", type=click.Choice(KINDS), help="only this kind")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins_list(kind: str | None, as_json: bool) -> None:
    """Every installed plugin: kind, name, package, version, summary."""
    from hvae_core.plugins import get_registry

    rows = get_registry().rows(kind)
    _warn_failures()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table("kind", "name", "package", "version", "summary", box=None, pad_edge=False)
    for row in rows:
        summary = f"error: {row['error']}" if "error" in row else row["summary"]
        cells = (row["kind"] or "?", row["name"] or "?", row["package"], row["version"], summary)
        table.add_row(*(escape(c) for c in cells))
    _console().print(table)


@plugins.command("show")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins_show(kind: str, name: str, as_json: bool) -> None:
    """The options of one plugin, with their defaults and help."""
    from hvae_core.config import MULTI_SELECTOR, PLUGIN_SECTION
    from hvae_core.options import describe_options
    from hvae_core.plugins import get_registry

    spec = get_registry().get(kind, name)
    options = describe_options(spec.options)
    section = PLUGIN_SECTION[kind]
    if kind in MULTI_SELECTOR:  # several may be chosen: each has its own subsection
        section = f"{section}.{name}"
    if as_json:
        row = spec.as_row() | {"section": section, "options": [vars(o) for o in options]}
        click.echo(json.dumps(row, indent=2, default=str))
        return
    click.echo(f"{spec.kind} {spec.name} ({spec.package} {spec.version}): {spec.summary}")
    if not options:
        click.echo("no options")
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table("option", "type", "default", "help", box=None, pad_edge=False)
    for o in options:
        kind_of = f"{o.type} (per scale)" if o.per_scale else o.type
        # Escaped: rich would read a default such as [false] as a markup tag and drop it.
        cells = (f"{section}.{o.name}", kind_of, json.dumps(o.default), o.help)
        table.add_row(*(escape(c) for c in cells))
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


@cli.group("cache")
def cache_group() -> None:
    """The persistent compilation cache (compiled steps kept across runs)."""


@cache_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cache_info(as_json: bool) -> None:
    """Where the cache is, whether it is on and why, its size and entries per backend."""
    from hvae_core.backends import compile_cache

    state = compile_cache.state()
    rows = [compile_cache.usage(name) for name in compile_cache.BACKENDS]
    if as_json:
        info = {
            "folder": str(compile_cache.cache_root()),
            "enabled": state.enabled,
            "reason": state.reason,
            "backends": {
                u.backend: {
                    "folder": str(u.folder),
                    "bytes": u.bytes,
                    "entries": u.entries,
                    "versions": u.versions,
                    "current": compile_cache.version_tag(u.backend),
                }
                for u in rows
            },
        }
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"folder: {compile_cache.cache_root()}")
    click.echo(f"compile cache: {'on' if state.enabled else 'off'} ({state.reason})")
    for u in rows:
        current = compile_cache.version_tag(u.backend)
        stale = [v for v in u.versions if v != current]
        line = f"{u.backend}: {_size(u.bytes)}, {u.entries} entries (now {current})"
        if stale:
            line += f"; also for {', '.join(stale)} ('hvae cache clear' removes them)"
        click.echo(line)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached


@cache_group.command("clear")
@click.option("--backend", type=click.Choice(BACKENDS), help="only this backend's cache")
def cache_clear(backend: str | None) -> None:
    """Remove the cached compiled code (of every backend, or of --backend)."""
    from hvae_core.backends import compile_cache

    try:
        removed = compile_cache.clear(backend)
    except OSError as exc:
        raise HvaeError(
            f"cannot remove {exc.filename or compile_cache.cache_root()}: {exc.strerror}",
            hint="check its permissions",
        ) from None
    what = f"the {backend} cache" if backend else "the compile cache"
    if not removed:
        click.echo(f"{what} is empty ({compile_cache.cache_root()})")
    for folder in removed:
        click.echo(f"removed {folder}")


@cli.command()
@config_options
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    metavar="RUN_DIR",
    help="continue the run in RUN_DIR where it stopped",
)
@click.option(
    "--init-from",
    type=click.Path(file_okay=False),
    metavar="RUN_DIR",
    help="start a new run from the weights (and EMA) of RUN_DIR's checkpoint, e.g. an "
    "imported model: fine-tuning; the model config must be that run's",
)
@click.option("--quiet", is_flag=True, help="log lines instead of progress bars")
@verbose_option
@click.option(
    "--devices",
    type=click.IntRange(min=0),
    help="data-parallel devices per process (run.devices; 0: every visible accelerator)",
)
@click.option(
    "--save/--no-save",
    default=None,
    help="keep a run directory (run.save; --no-save: train and print, keep nothing)",
)
@click.option(
    "--gpus",
    metavar="0,1,...",
    help="the GPUs to use, by index (run.gpus; sets CUDA_VISIBLE_DEVICES; default: all)",
)
@click.option(
    "--coordinator",
    metavar="HOST:PORT",
    help=f"multi-process runs: address of process 0 (or ${parallel_env.COORDINATOR_ENV})",
)
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    help=f"multi-process runs: how many (or ${parallel_env.NUM_PROCESSES_ENV})",
)
@click.option(
    "--process-id",
    type=click.IntRange(min=0),
    help=f"multi-process runs: this process's index (or ${parallel_env.PROCESS_ID_ENV})",
)
def train(
    config: str | None,
    overrides: tuple[str, ...],
    resume: str | None,
    init_from: str | None,
    quiet: bool,
    verbose: bool,
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    **flags: Any,
) -> None:
    """Train an HVAE; writes a run directory under run.save_dir."""
    launch = {
        parallel_env.COORDINATOR_ENV: coordinator,
        parallel_env.NUM_PROCESSES_ENV: num_processes,
        parallel_env.PROCESS_ID_ENV: process_id,
    }
    for name, value in launch.items():
        if value is not None:  # the flags win over the environment
            os.environ[name] = str(value)
    try:
        with contextlib.ExitStack() as held:
            trainer, rows = _train(
                config, overrides, resume, init_from, quiet, verbose, flags, held
            )
    except parallel_env.Relaunch as relaunch:  # after the lock is released: the workers take it
        sys.exit(relaunch.run(["-m", "hvae_core", *sys.argv[1:]]))
    if not trainer.parallel.is_chief:
        return
    last = rows[-1] if rows else {}
    val = last.get("val_bpd")
    where = trainer.run_dir if trainer.config.run.save else "nothing saved"
    click.echo(
        f"done: {where} (epoch {last.get('epoch', 0)}"
        + (f", val {val:.4f} bpd)" if val is not None else ")")
    )


def _train(
    config: str | None,
    overrides: tuple[str, ...],
    resume: str | None,
    init_from: str | None,
    quiet: bool,
    verbose: bool,
    flags: dict[str, Any],
    held: contextlib.ExitStack,
) -> tuple[Any, list[dict[str, Any]]]:
    """Build and run the trainer of a new or resumed run, in one pass downward: config -> run
    (planned: the save directory checked, or the checkpoint read once) -> backend -> parts ->
    run (begun) -> trainer. The run directory stays locked (``held``) while this process may
    write it."""
    from hvae_core.run import RunDirectory

    writes = parallel_env.chief_from_env()  # only process 0 writes, and locks
    checkpoint = start = None
    if init_from is not None:
        if resume is not None:
            raise ConfigError(
                "--init-from starts a new run; --resume continues one",
                hint="give one of them",
            )
        start = RunDirectory.open(init_from).read_checkpoint()  # read once, before building
    if resume is not None:
        run = RunDirectory.open(resume)
        cfg = run.resume_config(config, overrides, flags)
        if not cfg.run.save:
            raise ConfigError(
                "run.save is false, but --resume continues a run directory by writing to it",
                hint="drop --set run.save=false",
            )
        if writes:
            held.enter_context(run.writing(_warning))
        # Read and checked once, before the model is built: missing, invalid, or another model.
        checkpoint = run.read_checkpoint(cfg)
    else:
        cfg = _resolve(config, overrides, **flags)
        run = RunDirectory.planned(cfg.run.save_dir) if writes and cfg.run.save else None
    parts = _assemble(cfg, verbose)
    held.callback(parts.parallel.close)
    if not parts.parallel.is_chief:
        run = None
    elif checkpoint is not None:
        run.write_config(cfg)
    elif run is not None:
        run.begin(cfg, _warning)
        held.callback(run.unlock)
    from hvae_core.training.trainer import Trainer

    trainer = Trainer(parts, run, quiet=quiet)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        del checkpoint  # its arrays are in the engine now
    if start is not None:
        trainer.init_from(start)
        del start
    return trainer, trainer.fit()


def _warning(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _assemble(cfg: Any, verbose: bool) -> Any:
    """The run's parts, on the backend it names (started here, its native logs hidden unless
    ``verbose``)."""
    from hvae_core.backends import native_logs as logs
    from hvae_core.backends.select import import_backend, select_backend

    quiet_logs = logs.log_level(verbose) == logs.QUIET
    if quiet_logs:
        logs.quiet_native_logs()
    select_backend(cfg.run.backend, cfg.run.gpus, cfg.run.compile_cache, _warning)
    import_backend(quiet_logs)
    from hvae_core.training.setup import assemble

    return assemble(cfg)


def _load(run_dir: str, checkpoint: str | None, backend: str | None, verbose: bool) -> Any:
    """A run's trained model for a command (prints what loading it warns about)."""
    import warnings

    from hvae_core.errors import RunWarning
    from hvae_core.trained import load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunWarning)
        model = load(run_dir, checkpoint, backend, verbose=verbose)
    for warning in caught:
        if issubclass(warning.category, RunWarning):
            click.echo(f"warning: {warning.message}", err=True)
        else:  # what the backends warn about keeps its usual path
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return model


def _output_path(path: str, force: bool) -> Path:
    """Where a command may write ``path``: never over a run directory's files, over another
    existing file only with ``--force``; missing folders are created."""
    from hvae_core.run import is_run_file

    out = Path(path)
    if _looked_up(out) is not None:
        if out.is_dir():
            raise HvaeError(f"{out} is a directory", hint="give a file name")
        if is_run_file(out):
            raise HvaeError(
                f"{out} belongs to a run directory; hvae never overwrites a run's files",
                hint="write to a new file name",
            )
        if not force:
            raise HvaeError(f"{out} exists", hint="add --force to overwrite it")
    _existing_ancestor(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _folder_error(out.parent, exc) from None
    # The write itself, tried now with the temporary file the real one starts as (see
    # atomic_write_bytes): a folder that refuses it fails before the model runs, not after
    # the command's other outputs are written.
    _try_writing(out.parent, f".{out.name}.", _shown(out))
    return out


def _exists(path: str | Path) -> bool:
    """Whether ``path`` names something (links followed), as pathlib's exists(), but a name
    the system refuses to look up is one line (see :func:`_looked_up`)."""
    return _looked_up(Path(path), follow=True) is not None


def _looked_up(path: Path, follow: bool = False) -> os.stat_result | None:
    """``path``'s own status (a link is not followed unless ``follow``), None where nothing is
    there. A name the system refuses to look up (too long, a loop of links) is one line:
    pathlib's exists() raises it as a bare OSError."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise HvaeError(
            f"cannot use {_shown(path)}: {exc.strerror or exc}",
            hint="give a shorter or simpler path"
            if exc.errno == errno.ENAMETOOLONG
            else "check the path",
        ) from None


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists; the names below it, which a
    command would create, must each fit the file system (the system names only the first
    missing folder when a path is looked up, never a name too long below it)."""
    existing = next(p for p in (path, *path.parents) if _looked_up(p) is not None)
    limit = _name_max(existing)
    if any(len(os.fsencode(part)) > limit for part in path.relative_to(existing).parts):
        raise HvaeError(
            f"cannot use {_shown(path)}: {os.strerror(errno.ENAMETOOLONG)}",
            hint="give a shorter or simpler path",
        )
    return existing


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, that the file system of ``folder`` takes."""
    try:
        return os.pathconf(folder if folder.is_dir() else folder.parent, "PC_NAME_MAX")
    except (OSError, ValueError):  # not POSIX, or the file system does not say
        return 255


def _shown(path: Path) -> str:
    """``path`` for an error line: a name of hundreds of characters is cut in the middle."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-40:]} ({len(text)} characters)"


def _try_writing(folder: Path, prefix: str, what: str) -> None:
    """Create a file in ``folder`` (its name starting ``prefix``) and remove it again: one line,
    "cannot write ``what``", where the folder refuses it or the name is too long."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    except OSError as exc:
        raise HvaeError(
            f"cannot write {what}: {exc.strerror}",
            hint="check the folder's permissions, or write elsewhere",
        ) from None
    os.close(fd)
    os.unlink(probe)


def _output_folder(folder: Path, option: str) -> None:
    """Before a command loads its model: ``folder`` is a folder that takes new files, or can
    be made where it is missing; else one line (a file in the way, a name too long, a folder
    that refuses writes). Creates nothing: a command that fails later leaves no empty folder."""
    if _looked_up(folder) is not None and not folder.is_dir():
        raise HvaeError(f"{_shown(folder)} {_not_a_folder(folder)}", hint=f"give {option} a folder")
    existing = _existing_ancestor(folder)
    if existing == folder:
        _try_writing(folder, ".hvae-", f"into {_shown(folder)}")
        return
    try:  # the first folder that would be made, made and removed again
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".hvae-"))
    except OSError as exc:
        raise _folder_error(folder, exc) from None


def _not_a_folder(path: Path) -> str:
    """What ``path``, which exists but is no folder, is instead."""
    if path.is_symlink() and not path.exists():
        return f"is a link to {os.readlink(path)}, which does not exist"
    return "is a file"


def _folder_error(folder: Path, exc: OSError) -> HvaeError:
    """One line for a folder that could not be made: a file in its way is named."""
    blocker = next((p for p in (folder, *folder.parents) if p.is_file()), None)
    if isinstance(exc, FileExistsError | NotADirectoryError) and blocker is not None:
        return HvaeError(
            f"cannot create the folder {_shown(folder)}: {blocker} is a file",
            hint="choose a path that is not under a file",
        )
    return HvaeError(
        f"cannot create the folder {_shown(folder)}: {exc.strerror or exc}",
        hint="check the path and its permissions, or write elsewhere",
    )


def _progress(quiet: bool, what: str) -> Any:
    """A transient progress bar on stderr (stdout stays for results), or nothing."""
    if quiet:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        f"{what}",
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True, help="dataset split to evaluate")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="images (or importance samples) per forward pass (default: the run's batch size)",
)
@click.option(
    "--iw-samples",
    type=click.IntRange(min=1),
    help="also the importance-weighted bound on -log p(x) with K posterior draws per image "
    f"(costs K forward passes per image; at most {MAX_IW_SAMPLES:,})",
)
@click.option("--data-dir", type=click.Path(file_okay=False), help="folder of the dataset files")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--quiet", is_flag=True, help="no progress output")
@loaded_run_options
def evaluate(
    run_dir: str,
    split: str,
    checkpoint: str | None,
    batch_size: int | None,
    iw_samples: int | None,
    data_dir: str | None,
    backend: str | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Bits per dimension of a trained run on a split (EMA weights): the ELBO, and with
    --iw-samples the importance-weighted bound."""
    import time

    import numpy as np

    from hvae_core.data import evaluation_batches
    from hvae_core.model.evaluation import usage_line

    if iw_samples is not None and iw_samples > MAX_IW_SAMPLES:
        raise HvaeError(
            f"--iw-samples {iw_samples:,}: at most {MAX_IW_SAMPLES:,} posterior draws per image "
            "(each is one forward pass per image of the split)",
            hint="papers report K = 1,000 to 5,000; the bound changes little beyond",
        )
    model = _load(run_dir, checkpoint, backend, verbose)
    dataset = _dataset(model, data_dir)
    images = _split(model, dataset, split)
    if len(images) == 0:  # the batching below would blame the batch size
        raise HvaeError(
            f"split '{split}' of dataset {model.config.data.dataset} holds no images",
            hint=f"evaluate another split (--split; splits: {', '.join(dataset.splits)})",
        )
    size = batch_size or model.batch_size
    started = time.monotonic()
    passes = 1 if iw_samples is None else 2
    progress = _progress(quiet, split)
    with progress or contextlib.nullcontext():
        task = progress.add_task(split, total=passes * len(images)) if progress else None

        def batches() -> Any:
            for batch in evaluation_batches(images, size, dataset):
                yield batch
                if progress:
                    progress.advance(task, len(batch))

        summary = model.elbo(batches(), batch_size=size)
        if iw_samples is not None:
            per_image = []
            done = len(images)  # the ELBO's pass
            for batch in evaluation_batches(images, size, dataset):
                # One batch is K forward passes: the bar moves with each of them, not once per
                # batch (at K = 10,000 that was minutes without a move).
                moved = _moved_within(progress, task, done, len(batch))
                scores = model.log_likelihood(batch, iw_samples, batch_size=size, progress=moved)
                per_image.append(scores["per_image_bpd"])
                done += len(batch)
    row: dict[str, Any] = {
        "split": split,
        "images": summary["images"],
        "bpd": summary["elbo_bpd"],
        "recon_bpd": summary["recon_bpd"],
        "kl_bpd": summary["kl_bpd"],
        "kl_layers_bpd": summary["kl_layers_bpd"],
        "active_units": summary["active_units"],
        "active_units_total": summary["active_units_total"],
        "latent_dims_total": summary["latent_dims_total"],
        "active_layers": summary["active_layers"],
    }
    if iw_samples is not None:
        row["iw_samples"] = iw_samples
        row["iw_bpd"] = float(np.mean(np.concatenate(per_image)))
    row["seconds"] = round(time.monotonic() - started, 2)
    broken = _non_finite_keys(row)
    if broken:
        # NaN weights give NaN scores: say so once, and keep --json parseable by any reader
        # (bare NaN is not JSON).
        _warning(
            f"{', '.join(broken)} {'is' if len(broken) == 1 else 'are'} not finite: the "
            "checkpoint's weights may hold NaN or infinity"
            + (" (printed as null)" if as_json else "")
        )
    if as_json:
        from hvae_core.run import files as rundir

        click.echo(json.dumps(rundir.json_row(row), allow_nan=False))
        return
    click.echo(
        f"{split}: {row['bpd']:.4f} bits/dim (ELBO: recon {row['recon_bpd']:.4f}, "
        f"kl {row['kl_bpd']:.4f}) on {row['images']:,} images; {usage_line(summary)}"
    )
    if iw_samples is not None:
        click.echo(
            f"{split}: {row['iw_bpd']:.4f} bits/dim (importance-weighted bound, K = {iw_samples})"
        )


def _moved_within(progress: Any, task: Any, start: int, images: int) -> Any:
    """A ``progress`` callback (draws done, draws in all) of one call over ``images`` images,
    moving the bar from ``start`` by the share of the call's draws done; None without a bar."""
    if progress is None:
        return None

    def moved(done: int, total: int) -> None:
        progress.update(task, completed=start + images * done / total)

    return moved


def _non_finite_keys(row: dict[str, Any]) -> list[str]:
    """The keys of ``row`` whose number (or a number of whose list) is NaN or infinite."""

    def broken(value: Any) -> bool:
        if isinstance(value, list | tuple):
            return any(broken(v) for v in value)
        return isinstance(value, float) and not math.isfinite(value)

    return [key for key, value in row.items() if broken(value)]


KEEP_LAYERS_HELP = (
    "with --from: keep the top K latent layers' posterior latents of the images and sample the "
    "rest at --temperature (0: a sample from the prior; all layers: a reconstruction). Layers "
    "run top first, from 1x1 to the image size: on the cifar10 preset (1 layer at 1x1, 3 at "
    "4x4, 6 at 8x8, 11 at 16x16, 22 at 32x32) K=4 keeps every layer up to 4x4. Default with "
    "--from: all layers"
)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--n",
    "num",
    type=click.IntRange(min=1),
    help=f"number of samples (default 64); with --from, draws per image (default 1); at most "
    f"{MAX_SAMPLES:,} images in all",
)
@click.option(
    "--temperature",
    type=str,
    default="1.0",
    show_default=True,
    help="one temperature, or one per latent layer, comma-separated (with --from: one, for "
    "the layers below --keep-layers)",
)
@click.option(
    "--output-temperature",
    type=FiniteFloatRange(min=0),
    help="temperature of the pixel likelihood (0: its mode; default: 1, with --from 0)",
)
@click.option(
    "--from",
    "source",
    type=click.Path(),
    help="images whose latents to keep: an .npz of uint8 levels (N, H, W, C) or (N, H, W), "
    "a PNG, or a folder of PNGs",
)
@click.option("--keep-layers", type=click.IntRange(min=0), help=KEEP_LAYERS_HELP)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="samples.png",
    show_default=True,
    help="PNG grid to write (a name ending in .npz: the arrays instead)",
)
@click.option("--npz", type=click.Path(dir_okay=False), help="also write the raw samples")
@click.option("--seed", type=SEED, help="make the draw repeatable")
@click.option("--force", is_flag=True, help="overwrite --out / --npz if they exist")
@click.option("--quiet", is_flag=True, help="no progress output")
@loaded_run_options
def sample(
    run_dir: str,
    num: int | None,
    temperature: str,
    output_temperature: float | None,
    source: str | None,
    keep_layers: int | None,
    out: str,
    npz: str | None,
    seed: int | None,
    force: bool,
    checkpoint: str | None,
    backend: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Draw samples from a trained run (EMA weights); needs no dataset. With --from IMAGES
    (and --keep-layers K), resample the images below their top K latent layers: the grid's
    first row holds the images, each row below one draw per image."""
    import numpy as np

    from hvae_core import figures
    from hvae_core.trained import describe_kept

    if keep_layers is not None and source is None:
        raise HvaeError(
            "--keep-layers needs --from: the images whose top latent layers to keep",
            hint="e.g. --from images.npz --keep-layers 3",
        )
    temps = _temperature_list(
        temperature,
        "--temperature",
        example="e.g. --temperature 0.8 (1: the prior as trained, 0: its mean), or one per "
        "latent layer: --temperature 1,0.9,0.8",
    )
    if source is not None and len(temps) != 1:
        raise HvaeError(
            f"--temperature {temperature!r}: with --from it takes one temperature (the "
            "resampled layers')",
            hint="e.g. --temperature 0.8",
        )
    if num is not None:
        _check_sample_count(num, f"--n {num:,}")
    out_path, npz_path = _outputs(out, npz, force)
    if source is not None and not _exists(source):
        raise HvaeError(f"{source} does not exist", hint="give an .npz, a PNG or a folder of PNGs")
    model = _load(run_dir, checkpoint, backend, verbose)
    from hvae_core.model.pixels import to_uint8  # imports Keras: only once it is chosen

    if source is None:
        num = 64 if num is None else num
        t_out = 1.0 if output_temperature is None else output_temperature
        levels = model.sample(num, temps[0] if len(temps) == 1 else temps, t_out, seed=seed)
        arrays = {"samples": levels}
        grid = figures.grid_png(to_uint8(levels, model.num_bits))[0]
        message = f"wrote {num} samples"
    else:
        images = read_images(source, model.image_shape, model.num_bits)
        layers = model.num_latent_layers
        k = layers if keep_layers is None else keep_layers
        if k > layers:
            raise HvaeError(
                f"--keep-layers {k}: the model has {layers} latent layers (K runs 0..{layers})",
                hint="layer resolutions, top first: " + _resolution_runs(model.latent_resolutions),
            )
        draws = 1 if num is None else num
        _check_sample_count(draws * len(images), f"--n {draws:,} draws of {len(images):,} images")
        t_out = 0.0 if output_temperature is None else output_temperature
        levels = model.reconstruct(
            np.tile(images, (draws, 1, 1, 1)),
            t_out,
            latent_layers=k,
            temperature=temps[0],
            seed=seed,
        )
        arrays = {"images": images, "samples": levels, "keep_layers": np.array(k)}
        both = np.concatenate([images, levels])
        grid = figures.grid_png(to_uint8(both, model.num_bits), columns=len(images))[0]
        kept = describe_kept(model.latent_resolutions, k)
        message = (
            f"kept the top {k} of {layers} latent layers ({kept}) of {len(images)} images; "
            f"wrote {len(levels)} images"
        )
    written = _write_outputs(out_path, npz_path, grid, arrays, model.num_bits)
    click.echo(f"{message} to {' and '.join(str(p) for p in written)}")


def _check_sample_count(count: int, what: str) -> None:
    """``count`` images for hvae sample to draw: at most MAX_SAMPLES."""
    if count > MAX_SAMPLES:
        raise HvaeError(
            f"{what}: at most {MAX_SAMPLES:,} images per call (they are drawn and held in "
            "memory at once)",
            hint="draw more in several calls with different --seed values",
        )


def _outputs(out: str, npz: str | None, force: bool) -> tuple[Path, Path | None]:
    """Where a command writes its grid (or, for an .npz --out, its arrays) and its --npz."""
    out_path = _output_path(out, force)
    npz_path = _output_path(npz, force) if npz is not None else None
    if npz_path is not None and npz_path.resolve() == out_path.resolve():
        raise HvaeError("--out and --npz name the same file", hint="give them different names")
    return out_path, npz_path


def _write_outputs(
    out: Path, npz: Path | None, png: bytes, arrays: dict[str, Any], num_bits: int
) -> list[Path]:
    """The grid to ``out`` (the arrays, where ``out`` ends in .npz) and the arrays to ``npz``."""
    import numpy as np

    from hvae_core.run import files as rundir

    buffer = io.BytesIO()
    np.savez(buffer, **arrays, num_bits=np.array(num_bits))
    as_arrays = out.suffix.lower() == ".npz"
    rundir.atomic_write_bytes(out, buffer.getvalue() if as_arrays else png)
    if npz is not None:
        rundir.atomic_write_bytes(npz, buffer.getvalue())
    return [out] if npz is None else [out, npz]


def _resolution_runs(resolutions: list[int]) -> str:
    """ "1 at 1x1, 3 at 4x4, ...": how many latent layers each resolution has, top first."""
    counts: dict[int, int] = {}
    for r in resolutions:
        counts[r] = counts.get(r, 0) + 1
    return ", ".join(f"{n} at {r}x{r}" for r, n in counts.items())


def read_images(path: str, image_shape: tuple[int, ...], num_bits: int) -> Any:
    """uint8 levels (N, H, W, C) of a model of ``image_shape`` and ``num_bits`` from ``path``:
    an .npz (the array under ``images``, else its only array; (N, H, W, C), or (N, H, W) for
    grayscale, integer levels 0..2**num_bits - 1), a PNG or a folder of PNGs (8-bit grayscale
    or RGB as the model's channels say; for a model of fewer bits, pixels as ``hvae sample``
    writes them, on the grid of to_uint8). Anything else is one :class:`HvaeError`."""
    import numpy as np

    source = Path(path)
    if not source.exists():
        raise HvaeError(f"{source} does not exist", hint="give an .npz, a PNG or a folder of PNGs")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise HvaeError(f"{source} holds no .png files", hint="give a folder of PNGs")
        images = np.stack([_read_png(p, image_shape, num_bits) for p in files])
    elif source.suffix.lower() == ".npz":
        images = _read_npz(source, image_shape, num_bits)
    elif source.suffix.lower() == ".png":
        images = _read_png(source, image_shape, num_bits)[None]
    else:
        raise HvaeError(
            f"{source}: expected an .npz, a .png or a folder of PNGs",
            hint="save the images as uint8 levels in an .npz, or as PNGs",
        )
    return images


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _read_npz(path: Path, image_shape: tuple[int, ...], num_bits: int) -> Any:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            # hvae's own files: `hvae sample --npz` writes samples and num_bits, `hvae
            # interpolate --npz` a, b and interpolation (with num_bits).
            arrays = [k for k in keys if k != "num_bits"]
            named = [k for k in ("images", "samples", "interpolation") if k in keys]
            if named:
                key = named[0]
            elif len(arrays) == 1:
                key = arrays[0]
            else:
                raise HvaeError(
                    f"{path} holds {len(keys)} arrays ({', '.join(keys[:6])}) and none named "
                    "'images'",
                    hint="save the images under the key 'images' (or 'samples')",
                )
            array = data[key]
    except HvaeError:
        raise
    except Exception as exc:  # not an npz, truncated, pickled objects
        raise HvaeError(
            f"cannot read {path} as an .npz: {exc}",
            hint="give a .npz written by numpy.savez (hvae sample --npz writes one)",
        ) from None
    if array.ndim == 3 and image_shape[-1] == 1:
        array = array[..., None]
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(image_shape) or len(array) == 0:
        raise HvaeError(
            f"{path}: '{key}' has shape {array.shape}; the model takes images "
            f"(N, {', '.join(map(str, image_shape))})",
            hint="images of another size or channel count need a model trained on them",
        )
    top = 2**num_bits - 1
    if not np.issubdtype(array.dtype, np.integer):
        raise HvaeError(
            f"{path}: '{key}' holds {array.dtype}, not integer pixel levels",
            hint=f"store uint8 levels 0..{top} ({num_bits} bits)",
        )
    if array.min() < 0 or array.max() > top:
        raise HvaeError(
            f"{path}: levels run {array.min()}..{array.max()}; the model's {num_bits}-bit "
            f"images run 0..{top}",
            hint=f"reduce the images to {num_bits} bits (levels >> {8 - num_bits} for 8-bit images)"
            if num_bits < 8
            else None,
        )
    return array.astype(np.uint8)


def _read_png(path: Path, image_shape: tuple[int, ...], num_bits: int) -> Any:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    h, w, c = image_shape
    mode = {1: "L", 3: "RGB"}.get(c)
    try:
        with Image.open(path) as picture:
            picture.load()
            got_mode, size = picture.mode, picture.size
            pixels = np.asarray(picture)
    except (OSError, UnidentifiedImageError) as exc:
        raise HvaeError(
            f"cannot read {path} as an image: {exc}", hint="give a PNG file, or a folder of them"
        ) from None
    if got_mode != mode:
        kind = {1: "grayscale", 3: "RGB"}.get(c, f"{c}-channel")
        raise HvaeError(
            f"{path} is a PNG of mode {got_mode}; the model takes 8-bit {kind} images "
            f"(mode {mode})",
            hint=f"convert it, e.g. with PIL's Image.convert('{mode}')",
        )
    if size != (w, h):
        raise HvaeError(
            f"{path} is {size[1]}x{size[0]}; the model takes {_shape_text((h, w))} images",
            hint="resize it, or use a model trained at that size",
        )
    pixels = pixels.reshape(h, w, c)
    top = 2**num_bits - 1
    levels = np.rint(pixels.astype(np.float64) * top / 255.0).astype(np.uint8)
    back = np.rint(levels.astype(np.float64) * 255.0 / top).astype(np.uint8)
    if not np.array_equal(back, pixels):
        raise HvaeError(
            f"{path}: its pixels are not on the model's {num_bits}-bit grid (0..{top} scaled "
            "to 0..255, as hvae writes its PNGs)",
            hint=f"quantize the image to {num_bits} bits, or give an .npz of levels 0..{top}",
        )
    return levels


def _one_image(spec: str, image_shape: tuple[int, ...], num_bits: int) -> Any:
    """One image: a PNG, or IMAGES.npz:INDEX (the image at INDEX of an .npz of images)."""
    path, _, index = spec.rpartition(":") if ".npz:" in spec else (spec, "", "")
    if path.lower().endswith(".npz"):
        images = read_images(path, image_shape, num_bits)
        try:
            i = int(index) if index else None
        except ValueError:
            i = -1
        if i is None and len(images) == 1:
            i = 0
        if i is None or not 0 <= i < len(images):
            raise HvaeError(
                f"{spec}: name one of the {len(images)} images as {path}:INDEX",
                hint=f"INDEX runs 0..{len(images) - 1}",
            )
        return images[i]
    if Path(spec).is_dir():
        raise HvaeError(f"{spec} is a folder", hint="give one PNG, or IMAGES.npz:INDEX")
    return read_images(spec, image_shape, num_bits)[0]


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("image_a")
@click.argument("image_b")
@click.option(
    "--steps",
    type=click.IntRange(min=2),
    default=8,
    show_default=True,
    help="images from A's latents to B's, both ends included",
)
@click.option(
    "--posterior",
    type=click.Choice(["mean", "sample"]),
    default="mean",
    show_default=True,
    help="each image's latents: its posterior's means, or one draw (from --seed)",
)
@click.option(
    "--output-temperature",
    type=FiniteFloatRange(min=0),
    default=0.0,
    show_default=True,
    help="temperature of the pixel likelihood (0: its mode)",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="interpolation.png",
    show_default=True,
    help="PNG to write: A, the steps, B in one row (a name ending in .npz: the arrays instead)",
)
@click.option("--npz", type=click.Path(dir_okay=False), help="also write the raw images")
@click.option("--seed", type=SEED, help="make the draws repeatable")
@click.option("--force", is_flag=True, help="overwrite --out / --npz if they exist")
@loaded_run_options
def interpolate(
    run_dir: str,
    image_a: str,
    image_b: str,
    steps: int,
    posterior: str,
    output_temperature: float,
    out: str,
    npz: str | None,
    seed: int | None,
    force: bool,
    checkpoint: str | None,
    backend: str | None,
    verbose: bool,
) -> None:
    """Decode latents interpolated, layer by layer and linearly, between those of two images
    (IMAGE_A, IMAGE_B: a PNG, or IMAGES.npz:INDEX)."""
    import numpy as np

    from hvae_core import figures

    for spec in (image_a, image_b):
        if not _exists(spec.rpartition(":")[0] if ".npz:" in spec else spec):
            raise HvaeError(f"{spec} does not exist", hint="give a PNG, or IMAGES.npz:INDEX")
    out_path, npz_path = _outputs(out, npz, force)
    model = _load(run_dir, checkpoint, backend, verbose)
    from hvae_core.model.pixels import to_uint8  # imports Keras: only once it is chosen

    a = _one_image(image_a, model.image_shape, model.num_bits)
    b = _one_image(image_b, model.image_shape, model.num_bits)
    levels = model.interpolate(
        a, b, steps, posterior=posterior, output_temperature=output_temperature, seed=seed
    )
    row = np.concatenate([a[None], levels, b[None]])
    png = figures.grid_png(to_uint8(row, model.num_bits), columns=len(row))[0]
    arrays = {"a": a, "b": b, "interpolation": levels}
    written = _write_outputs(out_path, npz_path, png, arrays, model.num_bits)
    click.echo(f"wrote {steps} interpolated images to {' and '.join(str(p) for p in written)}")


@cli.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default="keras",
    show_default=True,
    help="keras: .keras files (keras.saving.load_model after 'import hvae_core.export'); "
    "savedmodel: TensorFlow SavedModels; onnx, openvino: graphs whose noise is an input, "
    "for ONNX Runtime and OpenVINO (pip install 'hvae[export]'; converted on TensorFlow)",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="folder to write the sampler and the encoder into",
)
@click.option(
    "--output-temperature",
    type=FiniteFloatRange(min=0),
    default=1.0,
    show_default=True,
    help="the sampler's pixel likelihood temperature (0: its mode)",
)
@click.option(
    "--seed",
    type=SEED,
    help="start the exports' noise from this seed wherever they are loaded (the same seed, "
    "the same draws; default: the run's training seed)",
)
@click.option("--force", is_flag=True, help="replace an earlier export in --out")
@loaded_run_options
def export(
    run_dir: str,
    fmt: str,
    out: str,
    output_temperature: float,
    seed: int | None,
    force: bool,
    checkpoint: str | None,
    backend: str | None,
    verbose: bool,
) -> None:
    """Export a trained run as a sampler (temperature per image -> pixels) and an encoder
    (pixels -> every layer's posterior), EMA weights."""
    folder = _out_folder(out, "export")
    _output_folder(folder, "--out")
    earlier = [p.name for p in (folder.iterdir() if folder.is_dir() else []) if p.stem in STEMS]
    _refuse_earlier(folder, earlier, "an export", force)
    check_format(fmt)
    if fmt in PORTABLE:
        if backend not in (None, CONVERTING_BACKEND):
            raise HvaeError(
                f"the {fmt} export is converted on the {CONVERTING_BACKEND} backend",
                hint="leave out --backend (the run's weights load on every backend)",
            )
        if seed is not None:
            raise HvaeError(
                f"--seed sets the noise stream of keras and savedmodel exports; a {fmt} "
                "export takes its noise as an input",
                hint="draw the noise from a seed on the host (see the export's export.json)",
            )
        backend = CONVERTING_BACKEND
    model = _load(run_dir, checkpoint, backend, verbose)
    from hvae_core.export import export_model

    written = export_model(
        model,
        fmt,
        folder,
        output_temperature=output_temperature,
        seed=seed,
        replace=force,
        verbose=verbose,
    )
    click.echo(f"wrote {', '.join(str(p) for p in written)}")


MIN_USAGE_IMAGES = 2  # a variance over the images needs two of them


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="folder for the figures (default: RUN_DIR/analysis)",
)
@click.option("--split", default="val", show_default=True, help="dataset split to analyse")
@click.option(
    "--images",
    "num_images",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="images of the split the latent usage is measured on (2 or more)",
)
@click.option(
    "--temperatures",
    default="0.6,0.8,0.9,1.0",
    show_default=True,
    help="prior temperatures of the samples figure, comma-separated",
)
@click.option(
    "--temperature",
    type=FiniteFloatRange(min=0),
    default=0.8,
    show_default=True,
    help="prior temperature below the conditioned layers in the top-down figure",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="of every random draw")
@click.option("--force", is_flag=True, help="replace the figures of an earlier analysis")
@click.option("--data-dir", type=click.Path(file_okay=False), help="folder of the dataset files")
@loaded_run_options
def analyze(
    run_dir: str,
    out: str | None,
    split: str,
    num_images: int,
    temperatures: str,
    temperature: float,
    seed: int,
    force: bool,
    data_dir: str | None,
    checkpoint: str | None,
    backend: str | None,
    verbose: bool,
) -> None:
    """Figures of what the hierarchy learned: latent usage per layer, reconstructions from
    the top layers, samples across temperatures (the last needs no data)."""
    import numpy as np

    from hvae_core.analysis import FIGURES, write_figures
    from hvae_core.data import evaluation_batches

    if num_images < MIN_USAGE_IMAGES:
        # A unit is active when its posterior mean varies over the images: one image has no
        # variance, and the figure would report every dimension inactive.
        raise HvaeError(
            f"--images {num_images}: active units are the latent dimensions whose posterior "
            f"mean varies over the images, which takes {MIN_USAGE_IMAGES} or more",
            hint="give --images 2 or more (default 1000)",
        )
    temps = _temperature_list(temperatures, "--temperatures")
    folder = _out_folder(out, "analysis") if out is not None else Path(run_dir) / "analysis"
    _output_folder(folder, "--out")
    _refuse_earlier(folder, [n for n in FIGURES if (folder / n).exists()], "an analysis", force)
    model = _load(run_dir, checkpoint, backend, verbose)
    images = None
    try:
        dataset = _dataset(model, data_dir)
    except HvaeError as exc:  # no data: the figures that need none are still made
        click.echo(f"warning: no data ({exc.one_line()}); only the samples figure", err=True)
    else:
        subset = _split(model, dataset, split)[:num_images]
        if len(subset) < MIN_USAGE_IMAGES:
            raise HvaeError(
                f"split '{split}' of dataset {model.config.data.dataset} holds {len(subset)} "
                f"image{'' if len(subset) == 1 else 's'}; active units are the latent "
                f"dimensions whose posterior mean varies over the images, which takes "
                f"{MIN_USAGE_IMAGES} or more",
                hint=f"analyse a split with 2 or more images (--split; splits: "
                f"{', '.join(dataset.splits)})",
            )
        images = np.concatenate(list(evaluation_batches(subset, model.batch_size, dataset)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # checked before loading; the folder may have changed since
        raise _folder_error(folder, exc) from None
    written, lines = write_figures(model, folder, images, temps, temperature, seed)
    for line in lines:
        click.echo(line)
    click.echo(f"wrote {', '.join(str(p) for p in written)}")


@cli.group("import")
def import_group() -> None:
    """Turn another implementation's checkpoint into an hvae run directory."""


@import_group.command("vdvae")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--preset",
    type=click.Choice(VDVAE_PRESETS),
    help="the VDVAE hyper-parameter set (default: recognised from the tensors)",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    metavar="RUN_DIR",
    help="the run directory to write (new or empty; default: a new one under run.save_dir)",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="override a training or run option of the imported run (repeatable)",
)
@click.option("--backend", type=click.Choice(BACKENDS), help="Keras backend that builds the model")
@verbose_option
def import_vdvae_command(
    file: str,
    preset: str | None,
    out: str | None,
    overrides: tuple[str, ...],
    backend: str | None,
    verbose: bool,
) -> None:
    """Import an openai/vdvae checkpoint (a torch.save'd state dict, e.g. the published
    ...-model-ema.th): every tensor to its hvae weight, written as a run directory that
    evaluate, sample, analyze, export, hvae_core.load and train --init-from take."""
    from hvae_core.backends import native_logs as logs
    from hvae_core.backends.select import default_backend, import_backend, select_backend

    name = backend or os.environ.get("KERAS_BACKEND") or default_backend()
    quiet_logs = logs.log_level(verbose) == logs.QUIET
    if quiet_logs:
        logs.quiet_native_logs()
    select_backend(name, compile_cache_on=False, warn=_warning)
    import_backend(quiet_logs)
    from hvae_core.vdvae_import import import_vdvae

    done = import_vdvae(file, out=out, preset=preset, overrides=(*overrides, f"run.backend={name}"))
    widths = f" at the file's widths ({', '.join(done.overrides)})" if done.overrides else ""
    click.echo(
        f"imported {done.tensors:,} tensors ({done.parameters:,} parameters) as the "
        f"'{done.preset}' preset{widths}: {done.run_dir}"
    )


def _temperature_list(text: str, option: str, example: str | None = None) -> list[float]:
    """Comma-separated temperatures, each a finite number >= 0."""
    hint = example or f"e.g. {option} 0.6,0.8,1.0"
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise HvaeError(
            f"{option} {text!r}: expected numbers separated by commas", hint=hint
        ) from None
    if any(not math.isfinite(t) or t < 0 for t in values):
        raise HvaeError(f"{option} {text!r}: temperatures must be finite numbers >= 0", hint=hint)
    return values


def _out_folder(out: str, example: str) -> Path:
    """The folder --out names; an empty one would be the current folder (Path("") is "."),
    which the command would fill without being asked to."""
    if not out.strip():
        raise HvaeError(
            "--out is empty" if not out else f"--out {out!r} is blank",
            hint=f"name a folder, e.g. --out {example}",
        )
    return Path(out)


def _refuse_earlier(folder: Path, earlier: list[str], what: str, force: bool) -> None:
    """An earlier command's output in ``folder`` is replaced only with --force."""
    if earlier and not force:
        raise HvaeError(
            f"{folder} already holds {what} ({', '.join(sorted(earlier))})",
            hint="add --force to replace it, or choose another --out",
        )


def _dataset(model: Any, data_dir: str | None) -> Any:
    """The run's dataset, from ``data_dir`` where given (the files may have moved)."""
    from hvae_core.config import resolve_config
    from hvae_core.data import open_dataset

    config = model.config
    if data_dir is not None:
        config = resolve_config(None, {"data_dir": data_dir}, (), base=config.to_dict())
    dataset = open_dataset(config)
    if dataset.num_bits != model.num_bits:  # its images would be read at the wrong depth
        raise HvaeError(
            f"dataset {config.data.dataset} gives {dataset.num_bits}-bit images; the run's "
            f"model was trained on {model.num_bits}-bit ones",
            hint="give the run's own data (--data-dir), or set data.num_bits in its "
            "config.yaml to the depth it trained with",
        )
    return dataset


def _split(model: Any, dataset: Any, split: str) -> Any:
    """The images of ``split``, or one line naming the splits there are."""
    if split not in dataset.splits:
        raise HvaeError(
            f"dataset {model.config.data.dataset} has no split '{split}'",
            hint=f"splits: {', '.join(dataset.splits)}",
        )
    return dataset.load(split)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="hvae")
