"""Random numbers keyed by integers (`modellego.core.keyed`)."""
from __future__ import annotations

import torch

from modellego.core.keyed import _mul32, keyed, keyed_uniform, mix


def test_the_split_multiplication_is_multiplication_modulo_two_to_the_32() -> None:
    x = torch.cat([torch.randint(0, 2**32, (3000,), generator=torch.Generator().manual_seed(0)),
                   torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31, 2**32 - 1])])
    for c in (0x85EBCA6B, 0xC2B2AE35, 3, 2**32 - 1):
        assert _mul32(x, c).tolist() == [(int(v) * c) % 2**32 for v in x]


def test_keys_are_the_same_however_they_are_batched_and_differ_between_keys() -> None:
    ids = torch.arange(10_000)
    whole = keyed(7, 3, ids)
    assert torch.equal(torch.cat([keyed(7, 3, part) for part in ids.split(333)]), whole)
    assert int(keyed(7, 3, 42)) == int(whole[42])  # an int key is the same key
    assert len(torch.unique(whole)) == len(ids)  # a bijection of 32 bits: no collision among these
    assert not torch.equal(keyed(8, 3, ids), whole) and not torch.equal(keyed(7, 4, ids), whole)
    assert keyed(0, torch.arange(3)[:, None], torch.arange(5)).shape == (3, 5)
    assert int(mix(torch.tensor(0))) == 0 and 0 <= int(whole.min()) and int(whole.max()) < 2**32


def test_keyed_uniforms_look_uniform() -> None:
    u = keyed_uniform(1, torch.arange(200_000))
    assert u.dtype == torch.float64 and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert float(counts.min()) > 0.95 * 10_000 and float(counts.max()) < 1.05 * 10_000
    # Consecutive ids are not correlated (a weak hash of i would give nearly equal neighbours).
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
