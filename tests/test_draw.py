"""The seeded one-pass calibration draw (`modellego.calibration.draw`)."""
from __future__ import annotations

import pytest
import torch

from modellego.calibration.draw import CalibrationDraw
from modellego.core.keyed import keyed_uniform
from modellego.errors import UserError


def _stream(n: int = 300, batch: int = 32, classes: int = 4):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, 3, 3, generator=g)
    y = torch.arange(n) % classes
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)], x, y


def test_the_draw_is_the_samples_with_the_smallest_seeded_keys_in_stream_order() -> None:
    stream, x, y = _stream()
    draw = CalibrationDraw([1, 3], images=50, seed=5)
    for xb, yb in stream:
        draw.update(xb, yb)
    keys = keyed_uniform(5, torch.arange(len(y)))  # keyed by stream position
    mine = torch.nonzero(torch.isin(y, torch.tensor([1, 3]))).flatten()
    want = torch.sort(mine[torch.topk(keys[mine], 50, largest=False).indices]).values  # stream order
    got_x = torch.cat([b[0] for b in draw.batches(batch_size=16)])
    got_y = torch.cat([b[1] for b in draw.batches(batch_size=16)])
    assert len(draw) == 50 and torch.equal(got_x, x[want]) and torch.equal(got_y, y[want])
    assert [len(b[1]) for b in draw.batches(batch_size=16)] == [16, 16, 16, 2]


def test_same_seed_same_draw_other_seed_other_draw_and_fewer_samples_than_asked() -> None:
    stream, _, _ = _stream()
    draws = []
    for seed in (0, 0, 1):
        d = CalibrationDraw(None, images=40, seed=seed)
        for xb, yb in stream:
            d.update(xb, yb)
        draws.append(torch.cat([b[0] for b in d.batches()]))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    small = CalibrationDraw([0], images=1000)
    for xb, yb in stream:
        small.update(xb, yb)
    assert len(small) == 75  # every sample of class 0 in 300 (labels cycle over 4 classes)


def test_shards_of_the_stream_hold_the_one_process_draw_between_them() -> None:
    """Each shard (every 3rd sample from its rank) keeps its part of the one-process draw; the
    reduce across processes (tests/test_distributed.py) gathers exactly those."""
    stream, x, y = _stream()
    one = CalibrationDraw([0, 2], images=40, seed=1)
    for xb, yb in stream:
        one.update(xb, yb)
    want = torch.cat([b[0] for b in one.batches()])
    parts = []
    for rank in range(3):
        d = CalibrationDraw([0, 2], images=40, seed=1, shard=(rank, 3))
        for i in range(0, 300, 25):  # other batch sizes than the one process's
            d.update(x[rank::3][i:i + 25], y[rank::3][i:i + 25])
        parts.append(d)
    held, keys = torch.cat([d._order for d in parts]), torch.cat([d._keys for d in parts])
    smallest = held[torch.topk(keys, 40, largest=False).indices]
    assert torch.equal(torch.sort(smallest).values, torch.sort(one._order).values)
    kept = [d._order[torch.isin(d._order, one._order)] for d in parts]
    assert all(int(k.min()) % 3 == r for r, k in enumerate(kept))  # every shard holds some of it
    assert torch.equal(x[torch.sort(torch.cat(kept)).values], want)


def test_a_full_draw_replaces_only_what_a_smaller_key_displaces() -> None:
    """Fed one sample at a time, a full draw ends holding the same samples as fed all at once."""
    stream, x, y = _stream()
    whole, single = CalibrationDraw(None, images=30, seed=2), CalibrationDraw(None, images=30, seed=2)
    whole.update(x, y)
    for i in range(len(y)):
        single.update(x[i:i + 1], y[i:i + 1])
    assert len(single) == 30
    assert torch.equal(torch.cat([b[0] for b in single.batches()]), torch.cat([b[0] for b in whole.batches()]))


def test_wrap_feeds_the_first_pass_only_and_keeps_len() -> None:
    stream, _, _ = _stream()
    draw = CalibrationDraw(None, images=1000)
    tapped = draw.wrap(stream)
    assert len(tapped) == len(stream)  # type: ignore[arg-type]
    assert sum(len(b[1]) for b in tapped) == 300
    assert sum(len(b[1]) for b in tapped) == 300  # a second reading passes through
    assert len(draw) == 300  # each sample offered once
    assert not hasattr(draw.wrap(iter(stream)), "__len__")


def test_errors() -> None:
    with pytest.raises(UserError, match="at least one image"):
        CalibrationDraw([0], images=0)
    with pytest.raises(UserError, match="0 <= rank < world_size"):
        CalibrationDraw([0], shard=(2, 2))
    draw = CalibrationDraw([7])
    draw.update(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(UserError, match=r"no training image of classes \[7\].*3 samples seen"):
        draw.batches()
    with pytest.raises(UserError, match="3 inputs but 2 labels"):
        draw.update(torch.zeros(3, 1), torch.zeros(2, dtype=torch.long))
