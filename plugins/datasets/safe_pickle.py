"""Reading pickled dataset files without letting them run code.

A pickle can call any importable function while it loads (``os.system``, ``builtins.eval``):
unpickling a downloaded file is running it. The CIFAR-10 python release is a set of pickles,
so they are read with :class:`NumpyOnlyUnpickler`, which resolves an exact list of globals and
refuses every other one before anything is called. The list is what pickles of plain data and
numpy arrays name, as Python 2 (the release) and Python 3 (re-packaged copies, protocols 0 to
5) write them, under both spellings of numpy's core module (``numpy.core`` before numpy 2,
``numpy._core`` since):

- numpy's ``dtype``, ``ndarray``, ``multiarray._reconstruct`` and ``multiarray.scalar``, and
  ``numeric._frombuffer`` (protocol 5);
- ``_codecs.encode(text, "latin1")``: how Python 3 writes ``bytes`` below protocol 3;
- ``bytes()`` with no argument: how it writes an empty ``bytes`` there.

None of them is numpy's own: each is a stand-in that checks its arguments. A pickled array is
rebuilt from its shape, byte order and raw bytes with ``np.frombuffer`` once the whole file is
read; numpy never receives a pickled dtype's state, whose flags could otherwise mark integers
as object pointers. Only plain scalar kinds are admitted (bool, integers, floats, complex,
fixed-width strings): no object, structured or void dtype.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import numpy as np

# Kinds whose values are plain bytes in memory: no pointers, no fields.
PLAIN_KINDS = frozenset("biufcSU")


def _text(value: Any, what: str) -> str:
    """A str from a Python 3 str or a Python 2 string (read as bytes)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise pickle.UnpicklingError(f"refused a {what} of type {type(value).__name__}")
    return value


def _raw_bytes(value: Any, what: str) -> bytes | bytearray:
    if isinstance(value, pickle.PickleBuffer):
        value = value.raw().tobytes()
    if not isinstance(value, bytes | bytearray):
        raise pickle.UnpicklingError(f"refused {what} of type {type(value).__name__}")
    return value


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
    ):
        raise pickle.UnpicklingError(f"refused an array shape {value!r:.80}")
    return tuple(value)


class PickledDtype:
    """Stands in for ``numpy.dtype(name, align, copy)`` and the state the pickle then sets."""

    def __init__(self, name: Any, *_align_copy: Any) -> None:
        self.name = _text(name, "dtype name")
        self.state: tuple[Any, ...] | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5:
            raise pickle.UnpicklingError(f"refused a dtype state {state!r:.80}")
        self.state = state

    def resolve(self) -> np.dtype:
        """The dtype, built afresh from its name and byte order; a non-plain one is refused."""
        try:
            dtype = np.dtype(self.name)
        except (TypeError, ValueError) as exc:
            raise pickle.UnpicklingError(f"refused dtype {self.name!r:.40}: {exc}") from None
        if dtype.kind not in PLAIN_KINDS:
            raise pickle.UnpicklingError(f"refused a {dtype} array (object or structured)")
        if self.state is not None:
            _version, order, subarray, names, fields = self.state[:5]
            if (subarray, names, fields) != (None, None, None):
                raise pickle.UnpicklingError(f"refused a structured {self.name} dtype")
            order = _text(order, "byte order")
            if order in ("<", ">"):
                dtype = dtype.newbyteorder(order)
        return dtype


def _dtype(value: Any) -> np.dtype:
    if not isinstance(value, PickledDtype):
        raise pickle.UnpicklingError(f"refused a dtype of type {type(value).__name__}")
    return value.resolve()


def _array(data: Any, dtype: np.dtype, shape: Any, fortran: bool) -> np.ndarray:
    """A fresh, writable array of ``shape`` from its raw bytes; the size must match exactly."""
    raw, shape = _raw_bytes(data, "array data"), _shape(shape)
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"refused an array of shape {shape} {dtype}: {len(raw)} bytes of data"
        )
    flat = np.frombuffer(raw, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


class PickledArray:
    """Stands in for ``_reconstruct(ndarray, ...)``; the pickle then sets shape, dtype, data."""

    def __init__(self, subtype: Any, *_shape_typecode: Any) -> None:
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"refused to build an array of type {subtype!r:.80}")
        self.state: tuple[Any, ...] | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # the leading version
        if not isinstance(state, tuple) or len(state) != 4:
            raise pickle.UnpicklingError(f"refused an array state {state!r:.80}")
        self.state = state

    def resolve(self) -> np.ndarray:
        if self.state is None:
            raise pickle.UnpicklingError("refused an array the pickle never filled")
        shape, dtype, fortran, data = self.state
        array = _array(data, _dtype(dtype), shape, bool(fortran))
        # As numpy itself does on this path: the values in the machine's byte order.
        return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _scalar(dtype: Any, data: Any = None) -> np.generic:
    resolved = _dtype(dtype)
    return _array(data, resolved, (), False)[()]


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"refused an array order {order!r:.20}")
    return _array(buffer, _dtype(dtype), shape, order == "F")


def _latin1(text: Any, encoding: Any) -> bytes:
    """``_codecs.encode(text, "latin1")``: Python 3's spelling of ``bytes`` below protocol 3."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refused _codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how Python 3 writes ``b""`` below protocol 3; with an argument, refused."""
    if args:
        raise pickle.UnpicklingError("refused bytes() with an argument")
    return b""


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): PickledDtype,
    ("numpy", "ndarray"): np.ndarray,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}
for _core in ("numpy.core", "numpy._core"):
    ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = PickledArray
    ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
    ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list; nothing it named was called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"refused to load global {module}.{name}")
        self.module = module
        self.name = name


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that admits plain Python data and plain numpy arrays, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def _resolved(value: Any) -> Any:
    """``value`` with every stand-in replaced by the numpy object it describes."""
    if isinstance(value, PickledArray | PickledDtype):
        return value.resolve()
    if isinstance(value, dict):
        return {_resolved(k): _resolved(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return type(value)(_resolved(v) for v in value)
    return value


def loads_numpy_only(data: bytes) -> Any:
    """Unpickle ``data`` (Python 2 strings become bytes, as the CIFAR release needs)."""
    return _resolved(NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load())
