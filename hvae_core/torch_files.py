"""PyTorch's ``torch.save`` files read as numpy arrays, without PyTorch and without running code.

Since PyTorch 1.6 ``torch.save`` writes a zip archive: ``<name>/data.pkl`` pickles the object,
each tensor as a call of ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
whose storage is a persistent id naming a raw little-endian buffer ``<name>/data/<key>``. The
unpickler here resolves exactly those names (and ``collections.OrderedDict``) and refuses every
other global, so a file that would run code when ``torch.load`` unpickles it is refused with
nothing run: the same guarantee as ``torch.load(weights_only=True)``, and it needs no torch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeFile(pickle.UnpicklingError):
    """The file names a global other than a tensor's or a dict's."""


class NotATorchFile(ValueError):
    """Not a ``torch.save`` zip archive, or a malformed one."""


class _Storage:
    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype


def _rebuild_tensor(
    storage: np.ndarray, offset: int, size: Any, stride: Any, *unused: Any
) -> np.ndarray:
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if not size:
        return storage[offset].copy()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    if offset < 0 or last >= storage.size or any(s < 0 for s in stride):
        raise NotATorchFile("a tensor reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride]
    )
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        raise UnsafeFile(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise NotATorchFile(f"unknown persistent id {str(pid)[:60]}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _Storage):
            raise NotATorchFile("a storage of an unknown type")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise NotATorchFile(f"storage {key} is missing from the archive") from None
            dtype = np.dtype(storage_type.dtype).newbyteorder("<")
            if len(raw) % dtype.itemsize:
                raise NotATorchFile(f"storage {key} has a partial element")
            self.storages[key] = np.frombuffer(raw, dtype=dtype)
        return self.storages[key]


def load(path: str | os.PathLike[str]) -> Any:
    """The object a ``torch.save`` zip file holds, its tensors as numpy arrays. Raises
    :class:`UnsafeFile` for any other global, :class:`NotATorchFile` for anything else amiss."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise NotATorchFile("no data.pkl in the archive: not a torch.save file")
            prefix = pickles[0][: -len("/data.pkl")]
            order = f"{prefix}/byteorder"
            if order in archive.namelist() and archive.read(order).strip() != b"little":
                raise NotATorchFile("a big-endian file")
            return _Unpickler(archive.read(pickles[0]), archive, prefix).load()
    except zipfile.BadZipFile:
        raise NotATorchFile(
            "not a zip archive (PyTorch before 1.6 wrote another format; re-save the state "
            "dict with a newer PyTorch)"
        ) from None
    except (UnsafeFile, NotATorchFile):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise NotATorchFile(f"a malformed pickle ({type(exc).__name__}: {str(exc)[:80]})") from None
