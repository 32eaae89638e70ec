"""What ``hvae export`` can write, and what each format needs installed.

Light: imports no Keras, so the CLI checks a format (and its optional packages) before it
loads a model.
"""

from __future__ import annotations

import importlib.util

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
