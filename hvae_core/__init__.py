"""hvae: a plugin-based toolkit for training hierarchical VAEs on images with Keras 3.

Importing this package is light: it loads no Keras backend (TensorFlow, JAX or torch); a
backend is chosen only when a command builds a model.
"""

from hvae_core.errors import ConfigError, HvaeError, PluginError
from hvae_core.hookspecs import hookimpl
from hvae_core.options import NoOptions, option, per_scale

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "HvaeError",
    "NoOptions",
    "PluginError",
    "__version__",
    "hookimpl",
    "option",
    "per_scale",
]
