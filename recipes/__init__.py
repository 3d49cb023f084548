"""Recipes shipped with onnx-surgery: YAML files, usable by name (``surgery apply cleanup …``)."""
