"""CNN classifiers for Model LEGO, all traceable by ``torch.fx.symbolic_trace``.

Build them by name with :func:`create_model`; :func:`list_models` lists the names.
"""
from __future__ import annotations

# Importing the family modules registers their models.
from . import alexnet, googlenet, lenet, mobilenet, mobilenet_v3, resnet, vgg  # noqa: F401
from .registry import (
    classifier_layer,
    create_model,
    list_models,
    register_model,
    scaled,
)

__all__ = ["classifier_layer", "create_model", "list_models", "register_model", "scaled"]
