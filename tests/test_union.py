"""The union task of an assembly: its classes' images, relabelled to the assembly's outputs."""
from __future__ import annotations

import pytest
import torch

from modellego.assembly.assemble import assemble
from modellego.data.union import union_dataset
from modellego.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def test_union_dataset_relabels_to_assembly_outputs(trained) -> None:
    ds, _, comps = trained
    asm = assemble([comps[1], comps[0]])  # classes 3, 4, 5, 0, 1, 2
    union = union_dataset(asm, {"synthetic": ds})
    assert union.classes == tuple(f"synthetic:class{c}" for c in (3, 4, 5, 0, 1, 2))
    for split in ("train", "test"):
        part, src = union.split(split), ds.split(split)
        for j, c in enumerate((3, 4, 5, 0, 1, 2)):
            assert int((part.labels == j).sum()) == int((src.labels == c).sum()) > 0
            assert torch.equal(part.images[part.labels == j], src.images[src.labels == c])
    with pytest.raises(UserError, match="not an assembly"):
        union_dataset(comps[0], {"synthetic": ds})
