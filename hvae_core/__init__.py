"""hvae: a plugin-based toolkit for training hierarchical VAEs on images with Keras 3.

Importing this package is light: it loads no Keras backend (TensorFlow, JAX or torch); a
backend is chosen only when a command builds a model.
"""

from hvae_core.errors import ConfigError, HvaeError, PluginError
from hvae_core.hookspecs import hookimpl
from hvae_core.options import NoOptions, option, per_scale

__version__ = "0.1.0"

# Loaded on first use: importing hvae_core stays light (no Keras, no backend).
_LAZY = {
    "load": "hvae_core.trained",
    "TrainedModel": "hvae_core.trained",
    "RunDirectory": "hvae_core.run",
    "Noise": "hvae_core.noise",
    "NoiseShapes": "hvae_core.noise",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hvae_core' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "HvaeError",
    "NoOptions",
    "Noise",
    "NoiseShapes",
    "PluginError",
    "RunDirectory",
    "TrainedModel",
    "__version__",
    "hookimpl",
    "load",
    "option",
    "per_scale",
]
