"""Shared test settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_kernels.py). Triton
# reads this when it is first imported, so it is set before anything
# (modellego included) can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import modellego  # noqa: E402
from modellego.data import SyntheticSpec, batches, load_dataset
from modellego.evaluation.protocol import calibration_batches, model_transform
from modellego.training.fit import TrainConfig, train

from helpers import file_model, profiled_with_contributions

# Tiny models run many times faster single-threaded on a loaded 2-core machine.
torch.set_num_threads(1)


# --- Fixtures shared by several files. Expensive ones are built once per session, not once per file. ---


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A saved lenet5 file (test_checkpoint, test_files, test_profile)."""
    return modellego.save(file_model("lenet5"), tmp_path / "m.safetensors")


@pytest.fixture(scope="session")
def resnet():
    """A profiled resnet18 that keeps its contributions (test_budget, test_profile)."""
    return profiled_with_contributions("resnet18", 0.125)


SPEC = SyntheticSpec(num_classes=6, channels=1, image_size=28, train_per_class=120, test_per_class=40)


@pytest.fixture(scope="session")
def profiled():
    """A lenet5 trained on six synthetic classes, and its profile (test_fit, and `trained`)."""
    ds = load_dataset("synthetic", synthetic_spec=SPEC)
    model = train(TrainConfig(model="lenet5", width=0.25, data="synthetic", epochs=2, batch_size=16, lr=0.05),
                  dataset=ds, progress=False)
    assert model.modellego_info.provenance["test_accuracy"] > 80
    train_batches = list(batches(ds.train, 256, transform=model_transform(model, ds)))
    return ds, model, modellego.profile(model, train_batches)


@pytest.fixture(scope="session")
def trained(profiled):
    """The trained model's calibrated components of classes 0-2 and 3-5 (test_scaling, test_density, test_fit,
    test_union)."""
    ds, model, prof = profiled
    comps = [modellego.disassemble(model, cls, profile=prof, calibration=calibration_batches(model, ds, cls))
             for cls in ([0, 1, 2], [3, 4, 5])]
    return ds, model, comps
