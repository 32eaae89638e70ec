"""Reading pickled dataset files without letting them run code.

A pickle can call any importable function while it loads (``os.system``, ``builtins.eval``):
unpickling a downloaded file is running it. The CIFAR-10 python release is a set of pickles,
so they are read with :class:`NumpyOnlyUnpickler`, which resolves exactly the three globals a
pickled numpy array needs, under both spellings of numpy's core module (``numpy.core`` before
numpy 2, ``numpy._core`` since), and refuses every other one before anything is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

# What a pickled ndarray names, mapped to the live objects. ``_reconstruct`` is taken from the
# way numpy itself pickles an array rather than imported, because importing ``numpy.core`` on
# numpy 2 warns and ``numpy._core`` does not exist on numpy 1.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]


def _checked_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:  # an object array would unpickle arbitrary element objects
        raise pickle.UnpicklingError("refused an object-dtype array")
    return dtype


def _checked_reconstruct(subtype: Any, *args: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refused to build an array of type {subtype!r}")
    return _RECONSTRUCT(subtype, *args)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list; nothing it named was called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"refused to load global {module}.{name}")
        self.module = module
        self.name = name


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that admits plain Python data and numpy uint8-style arrays, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def loads_numpy_only(data: bytes) -> Any:
    """Unpickle ``data`` (Python 2 strings become bytes, as the CIFAR release needs)."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
