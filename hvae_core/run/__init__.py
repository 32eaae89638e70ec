"""A run directory: every read and write of one run.

- :mod:`.directory`: ``RunDirectory``, the run's life (create, lock, resume rules, open);
- :mod:`.files`: the file names and formats (config, metrics, checkpoint), atomic writes;
- :mod:`.checkpoint`: the checkpoint's metadata schema, the "same model and data" fingerprint,
  and the record of the plugins a run used;
- :mod:`.lock`: the lock that makes one process the run's writer.

Nothing here imports a Keras backend.
"""

from hvae_core.run.checkpoint import (
    RESUMABLE_SECTIONS,
    PluginUse,
    check_plugins,
    plugins_used,
)
from hvae_core.run.directory import RunDirectory, is_run_file

__all__ = [
    "RESUMABLE_SECTIONS",
    "PluginUse",
    "RunDirectory",
    "check_plugins",
    "is_run_file",
    "plugins_used",
]
