"""The hook specifications: hvae's public plugin API.

Each hook receives a ``register`` callable; a plugin calls it once per thing it provides::

    @hvae_core.hookimpl
    def register_flows(register):
        register("planar", "my_flows.planar:PlanarFlow", options=PlanarOptions,
                 summary="Planar flows (Rezende & Mohamed)")

``register(name, target, *, options=None, summary="", **info)``:

- ``name``: kebab-case, unique per kind across all installed packages.
- ``target``: the implementation, as ``"module:attribute"`` (imported only when used, so listing
  plugins stays fast and imports no backend) or the object itself.
- ``options``: a dataclass whose fields all have defaults; ``field(metadata={"help": ...})`` gives
  the help text, ``metadata={"per_scale": True}`` marks a list holding one value per scale
  (see :func:`hvae_core.options.per_scale`).
- ``summary``: one line for ``hvae plugins list``.
- ``info``: kind-specific facts known without importing the implementation (a dataset's
  ``image_size``, for example; see :class:`hvae_core.interfaces.Dataset` for a size taken
  from the images).

What each kind's target must be is defined in :mod:`hvae_core.interfaces`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "hvae"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_blocks(register: Register) -> None:
    """Register residual block types (kind ``block``)."""


@hookspec
def register_flows(register: Register) -> None:
    """Register posterior flows (kind ``flow``)."""


@hookspec
def register_attention(register: Register) -> None:
    """Register attention mechanisms between encoder and decoder (kind ``attention``)."""


@hookspec
def register_regularizers(register: Register) -> None:
    """Register training regularizers (kind ``regularizer``)."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets (kind ``dataset``)."""


@hookspec
def register_lr_schedules(register: Register) -> None:
    """Register learning-rate schedules (kind ``lr-schedule``)."""


@hookspec
def register_beta_schedules(register: Register) -> None:
    """Register KL-weight (beta) schedules (kind ``beta-schedule``)."""


@hookspec
def register_trackers(register: Register) -> None:
    """Register experiment trackers (kind ``tracker``)."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add subcommands to the ``hvae`` command line: ``cli`` is a ``click.Group``; add
    commands to it with ``@cli.command()`` or ``cli.add_command(...)``, as ``simonw/llm``'s
    plugins do. Called once per process, when the command line is built (keep the hook light:
    import heavy packages inside the commands). A command whose name hvae or another plugin
    already uses is ignored with a warning; an exception here is reported as the package's
    failure and the other commands stay available. Errors a command raises as
    :class:`hvae_core.HvaeError` end as one line, like hvae's own."""


# kind -> hook name; the order is the order kinds are listed in.
HOOK_FOR_KIND: dict[str, str] = {
    "block": "register_blocks",
    "flow": "register_flows",
    "attention": "register_attention",
    "regularizer": "register_regularizers",
    "dataset": "register_datasets",
    "lr-schedule": "register_lr_schedules",
    "beta-schedule": "register_beta_schedules",
    "tracker": "register_trackers",
}
KINDS: tuple[str, ...] = tuple(HOOK_FOR_KIND)
# Every hook a plugin package may implement.
HOOKS: tuple[str, ...] = (*HOOK_FOR_KIND.values(), "register_commands")
