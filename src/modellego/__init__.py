"""modellego: Model LEGO (MDA), disassembling and assembling trained CNN classifiers without training.

Common path::

    import modellego
    model = modellego.load("runs/lenet5-mnist")
    prof = modellego.profile(model, train_batches)          # route map of every class
    component = modellego.disassemble(model, [0, 1, 2], profile=prof)
    modellego.save(component, "runs/lenet5-mnist-0-2")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .assemble import assemble  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .disassemble import disassemble  # noqa: E402
from .info import InputSpec, ModelInfo, get_info  # noqa: E402
from .locate import Thresholds  # noqa: E402
from .merge import merge  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .profiling import Profile, profile  # noqa: E402
from .samples import select_samples  # noqa: E402

__all__ = [
    "__version__", "load", "save", "disassemble", "assemble", "merge", "profile", "Profile", "Thresholds", "select_samples",
    "create_model", "list_models", "ModelInfo", "InputSpec", "get_info",
]
