"""The one family of errors a user can cause; the CLI turns them into one clear line."""

from __future__ import annotations

import os

DEBUG_ENV = "HVAE_DEBUG"


def debug_requested() -> bool:
    """Whether ``HVAE_DEBUG`` asks for full tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class HvaeError(Exception):
    """A problem the user can fix (bad config, unknown plugin, missing file, ...).

    ``hint`` says what to do about it; the CLI prints ``error: <message> (hint: <hint>)``.
    """

    exit_code = 1
    # TensorFlow's autograph would re-raise an exception from traced code as a StagingError
    # holding a multi-line trace; this marker lets it keep its type, message and hint.
    ag_pass_through = True
    # Keras would re-raise an exception from a layer's call as a new one whose message is a
    # page naming the call's arguments; this marker (Keras' own, for an error it has already
    # rewritten) lets it pass as it is, one line.
    _keras_call_info_injected = True

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class ConfigError(HvaeError):
    """An invalid configuration value, key or file."""

    exit_code = 2


class PluginError(HvaeError):
    """An unknown plugin, a bad registration or a conflict between packages."""

    exit_code = 2


class Interrupted(HvaeError):
    """Ctrl-C (SIGINT) during a run; the shell's convention for it is exit status 130."""

    exit_code = 130


class InputError(HvaeError, ValueError):
    """Arrays handed to a trained model that it cannot take (wrong shape, type or values)."""


class RunWarning(UserWarning):
    """Something about a run that a user should know but that does not stop it (a plugin now
    installed at another version than the run used)."""
