"""What ``hvae export`` can write, and what each format needs installed.

Light: imports no Keras, so the CLI checks a format (and its optional packages) before it
loads a model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from hvae_core.errors import HvaeError

FORMATS = ("keras", "savedmodel", "onnx", "openvino")
PORTABLE = ("onnx", "openvino")  # noise is an input: hvae's code is not needed to run them
SUFFIX = {"keras": ".keras", "savedmodel": "", "onnx": ".onnx", "openvino": ".xml"}
MANIFEST = "export.json"  # a portable export's inputs, outputs and noise recipe
STEMS = ("sampler", "encoder", "export")  # what an export writes, by file stem
CONVERTING_BACKEND = "tensorflow"  # tf2onnx converts the model's TensorFlow graph

# The import name of each package a portable format needs, and its distribution's name.
_PACKAGES = {
    "onnx": {"onnx": "onnx", "tf2onnx": "tf2onnx"},
    "openvino": {"onnx": "onnx", "tf2onnx": "tf2onnx", "openvino": "openvino"},
}


def check_format(fmt: str) -> None:
    """One line for an unknown format or a missing optional package, before anything runs."""
    if fmt not in FORMATS:
        raise HvaeError(f"unknown export format '{fmt}'", hint=f"choose {', '.join(FORMATS)}")
    missing = [
        dist
        for module, dist in _PACKAGES.get(fmt, {}).items()
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise HvaeError(
            f"the {fmt} export needs {', '.join(missing)}, which is not installed",
            hint="pip install 'hvae[export]'",
        )


@contextlib.contextmanager
def staged_export(folder: Path, names: Sequence[str], replace: bool) -> Iterator[Path]:
    """A temporary folder inside ``folder`` (beside the export's entries ``names``) to write
    an export into; when the block ends without an error, each name moves from it to its
    place in ``folder`` (:func:`~hvae_core.run.files.replace_entry`). A failed write leaves
    ``folder`` as it was: an earlier export is never removed before the new one is complete.
    An earlier entry is replaced only with ``replace``; an OSError is one line."""
    from hvae_core.run.files import replace_entry, write_error

    earlier = [name for name in names if os.path.lexists(folder / name)]
    if earlier and not replace:
        raise HvaeError(
            f"{folder / earlier[0]} exists", hint="pass replace=True (--force) to replace it"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = tempfile.TemporaryDirectory(dir=folder, prefix=".export-")
    except OSError as exc:
        raise write_error(folder, exc) from None
    with staging as tmp:
        try:
            yield Path(tmp)
            for name in names:
                replace_entry(Path(tmp) / name, folder / name)
        except OSError as exc:
            raise write_error(folder, exc) from None
