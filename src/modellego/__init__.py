"""modellego: Model LEGO (MDA), disassembling and assembling trained CNN classifiers without training.

Common path::

    import modellego
    model = modellego.load("runs/lenet5-mnist")
    prof = modellego.profile(model, train_batches)          # route map of every class
    component = modellego.disassemble(model, [0, 1, 2], profile=prof)
    modellego.save(component, "runs/lenet5-mnist-0-2")

The package is layered; each layer imports only the ones below it:

    cli, demo                       entry points
    apps                            applications: decision routes, amalgamation and distillation
    files                           load / save / build: any model file back to its module
    assembly                        assemble, scale, density head
    cut                             plans, budgets, disassemble, merge
    calibration                     recon, BatchNorm re-estimation, logit calibration
    core                            samples, contributions, locating, Profile
    evaluation, training            metrics, the paper's protocol, fit / fine-tune
    models, data                    the zoo, datasets
    io                              ModelInfo, specs, plans, checkpoint bytes, atomic writes
    errors, hooks, memory, _version foundations
"""
from __future__ import annotations

from ._version import __version__
from .assembly.assemble import assemble
from .assembly.scaling import scale_assembly
from .core.locate import Thresholds
from .core.profiling import Profile, profile
from .core.samples import SelectionConfig, select_samples
from .cut.disassemble import disassemble
from .cut.merge import merge
from .files import load, save
from .io.info import InputSpec, ModelInfo, get_info
from .models import create_model, list_models

__all__ = [
    "__version__", "load", "save", "disassemble", "assemble", "merge", "scale_assembly", "profile", "Profile",
    "Thresholds", "SelectionConfig", "select_samples", "create_model", "list_models", "ModelInfo", "InputSpec", "get_info",
]
