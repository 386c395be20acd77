"""Streamed image folders (`modellego.data.stream`): layout, label files, transform, bad images, shards."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from modellego.data.stream import BadImage, StreamedBatches, StreamedImageFolder
from modellego.errors import UserError

Image = pytest.importorskip("PIL.Image")

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _img(path: Path, seed: int = 0, size: tuple[int, int] = (10, 8), fmt: str | None = None) -> Path:
    """A random RGB image of `size` (W, H) at `path` (parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _ds(root: Path, split: str = "train", **kw) -> StreamedImageFolder:
    kw.setdefault("size", 4)
    kw.setdefault("resize", 4)
    return StreamedImageFolder(root, split, **kw)


def _rel(ds: StreamedImageFolder) -> list[str]:
    return [ds.path(i).relative_to(ds.root).as_posix() for i in range(len(ds))]


def _grid(root: Path, classes: str = "abc", per_class: int = 4) -> StreamedImageFolder:
    """`per_class` 6x6 PNGs in each class folder of train/."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            _img(root / "train" / name / f"{i}.png", seed=10 * c + i, size=(6, 6))
    return _ds(root)


# --- layout ---


def test_nested_upper_case_hidden_and_non_image_files(tmp_path: Path) -> None:
    """Class folders are sorted names, nested images are found, hidden and non-image entries are skipped."""
    t = tmp_path / "train"
    _img(t / "b" / "images" / "x2.PNG", 1)
    _img(t / "b" / "images" / "x1.png", 2)
    _img(t / "a" / "p.JPEG", 3, fmt="JPEG")
    _img(t / "a" / "sub" / "q.jpg", 4, fmt="JPEG")
    _img(t / "a" / ".hidden.png", 5)
    _img(t / "a" / ".cache" / "z.png", 6)
    _img(t / ".trash" / "y.png", 7)
    (t / "a" / "notes.txt").write_text("not an image")
    (t / "b" / "images" / "x.gif").write_bytes(b"GIF89a")
    (t / "c").mkdir()  # a class with no images keeps its label
    ds = _ds(tmp_path)
    assert ds.classes == ("a", "b", "c")
    assert _rel(ds) == ["train/a/p.JPEG", "train/a/sub/q.jpg", "train/b/images/x1.png", "train/b/images/x2.PNG"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    for i in range(len(ds)):
        assert ds.path(i).relative_to(t).parts[0] == ds.classes[ds.labels[i]]
    again = _ds(tmp_path)
    assert _rel(again) == _rel(ds) and again.labels.tolist() == ds.labels.tolist()


def test_hidden_file_next_to_the_class_folders_is_skipped(tmp_path: Path) -> None:
    """A hidden `._x.png` (macOS AppleDouble) beside the class folders is skipped like other hidden entries."""
    _img(tmp_path / "train" / "a" / "x.png")
    (tmp_path / "train" / "._x.png").write_bytes(b"\x00\x05\x16\x07")
    assert len(_ds(tmp_path)) == 1


def test_class_folders_without_train_folder(tmp_path: Path) -> None:
    """`root/<class>/` is the train split; other splits then need classes=."""
    _img(tmp_path / "dog" / "1.png", 1)
    _img(tmp_path / "cat" / "1.png", 2)
    _img(tmp_path / "cat" / "0.png", 3)
    ds = _ds(tmp_path)
    assert ds.classes == ("cat", "dog") and _rel(ds) == ["cat/0.png", "cat/1.png", "dog/1.png"]
    assert ds.labels.tolist() == [0, 0, 1]
    with pytest.raises(UserError, match="classes="):
        _ds(tmp_path, "val")
    _img(tmp_path / "loose.png")
    with pytest.raises(UserError, match="outside class folders"):
        _ds(tmp_path)


# --- val: class folders and label files ---


def _tiny(root: Path) -> None:
    """Tiny-ImageNet style: train/<wnid>/images/, flat val/images/."""
    for k, wnid in enumerate(("n01", "n02", "n03")):
        _img(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", k, fmt="JPEG")
    for k in range(4):
        _img(root / "val" / "images" / f"val_{k}.JPEG", 10 + k, fmt="JPEG")


def test_val_with_class_folders(tmp_path: Path) -> None:
    """val/<class>/ takes its labels from the train classes; a class train lacks is an error."""
    _tiny(tmp_path)
    for name in ("n03", "n01"):
        _img(tmp_path / "v2" / "val" / name / "a.png")
        (tmp_path / "v2" / "train" / name).mkdir(parents=True)
    (tmp_path / "v2" / "train" / "n02").mkdir()
    ds = _ds(tmp_path / "v2", "val")
    assert _rel(ds) == ["val/n01/a.png", "val/n03/a.png"] and ds.labels.tolist() == [0, 2]
    _img(tmp_path / "v2" / "val" / "n0x" / "a.png")
    with pytest.raises(UserError, match="n0x"):
        _ds(tmp_path / "v2", "val")


def test_val_annotations_and_labels_txt(tmp_path: Path) -> None:
    """Tab-separated val_annotations.txt and space-separated labels.txt; unlabelled images are left out."""
    _tiny(tmp_path)
    val = tmp_path / "val"
    (val / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t5\t5\nval_1.JPEG\tn01\t1\t2\t3\t4\n\n")
    ds = _ds(tmp_path, "val")
    assert _rel(ds) == ["val/images/val_0.JPEG", "val/images/val_1.JPEG"] and ds.labels.tolist() == [1, 0]
    (val / "val_annotations.txt").unlink()
    (val / "labels.txt").write_text("images/val_3.JPEG   n03\nval_2.JPEG n01\r\n")
    ds = _ds(tmp_path, "val")
    assert _rel(ds) == ["val/images/val_2.JPEG", "val/images/val_3.JPEG"] and ds.labels.tolist() == [0, 2]


def test_explicit_label_file(tmp_path: Path) -> None:
    """label_file= is read as given, or relative to the split folder; train/ takes none."""
    _tiny(tmp_path)
    outside = tmp_path / "elsewhere.tsv"
    outside.write_text("val_3.JPEG\tn02\n")
    ds = _ds(tmp_path, "val", label_file=outside)
    assert _rel(ds) == ["val/images/val_3.JPEG"] and ds.labels.tolist() == [1]
    (tmp_path / "val" / "mine_8c1f.txt").write_text("val_0.JPEG n03\nval_1.JPEG n03\n")
    ds = _ds(tmp_path, "val", label_file="mine_8c1f.txt")
    assert _rel(ds) == ["val/images/val_0.JPEG", "val/images/val_1.JPEG"] and ds.labels.tolist() == [2, 2]
    with pytest.raises(UserError, match="label_file"):
        _ds(tmp_path, "train", label_file=outside)


@pytest.mark.parametrize("lines, match", [
    ("val_0.JPEG n01\nval_1.JPEG n0l\n", r"bad\.txt:2: class 'n0l' is not among.*Did you mean .*'n01'"),
    ("val_0.JPEG n01\nmissing.JPEG n02\n", r"bad\.txt:2: 'missing\.JPEG' is no image under"),
    ("val_0.JPEG n01\nimages/val_0.JPEG n02\n", r"bad\.txt:2: 'images/val_0\.JPEG' is labelled twice, also on line 1"),
    ("dup.png n01\n", r"bad\.txt:1: 'dup\.png' names several images"),
    ("val_0.JPEG\n", r"bad\.txt:1: expected 'filename label'"),
])
def test_label_file_errors(tmp_path: Path, lines: str, match: str) -> None:
    """Each bad line is a UserError naming the file and line."""
    _tiny(tmp_path)
    _img(tmp_path / "val" / "x" / "dup.png")
    _img(tmp_path / "val" / "y" / "dup.png")
    (tmp_path / "bad.txt").write_text(lines)
    with pytest.raises(UserError, match=match):
        _ds(tmp_path, "val", label_file=tmp_path / "bad.txt")
    (tmp_path / "ok.txt").write_text("x/dup.png n01\ny/dup.png n03\n")  # a path tells them apart
    ds = _ds(tmp_path, "val", label_file=tmp_path / "ok.txt")
    assert _rel(ds) == ["val/x/dup.png", "val/y/dup.png"] and ds.labels.tolist() == [0, 2]


# --- transform ---


def test_every_mode_gives_float32_rgb_or_grey(tmp_path: Path) -> None:
    """L, RGBA, P (with and without transparency) and RGB give (3, s, s), or (1, s, s) with channels=1."""
    a = tmp_path / "train" / "a"
    a.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    rgb.save(a / "rgb.png")
    rgb.convert("L").save(a / "grey.png")
    rgb.convert("RGBA").save(a / "rgba.png")
    rgb.convert("P").save(a / "pal.png")
    rgb.convert("P").save(a / "paltr.png", transparency=0)
    ds = _ds(tmp_path, size=6, resize=8, mean=MEAN, std=STD)
    assert [p.rsplit("/", 1)[-1] for p in _rel(ds)] == ["grey.png", "pal.png", "paltr.png", "rgb.png", "rgba.png"]
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 6, 6) and label == 0
    raw = ds[0][0] * ds.std + ds.mean  # grey becomes three equal channels
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)
    assert torch.allclose(ds[3][0], ds[4][0], atol=1e-6)  # the alpha is dropped
    grey = _ds(tmp_path, size=6, resize=8, channels=1, mean=(0.5,), std=(0.25,))
    for i in range(len(grey)):
        assert grey[i][0].dtype == torch.float32 and grey[i][0].shape == (1, 6, 6)


def test_values_match_an_independent_reference(tmp_path: Path) -> None:
    """Bilinear resize of the shorter side, center crop, /255, (x - mean) / std."""
    path = _img(tmp_path / "train" / "a" / "r.png", 5, size=(17, 11))
    ds = _ds(tmp_path, size=8, resize=10, mean=MEAN, std=STD)
    with Image.open(path) as im:
        small = im.convert("RGB").resize((15, 10), Image.BILINEAR)  # 17 * 10 / 11 = 15.45
    arr = np.asarray(small, dtype=np.float64)[1:9, 4:12] / 255  # top (10-8)/2 = 1, left round(3.5) = 4
    want = (arr - np.array(MEAN)) / np.array(STD)
    x, _ = ds[0]
    assert x.shape == (3, 8, 8)
    assert np.abs(x.permute(1, 2, 0).numpy() - want).max() < 1e-6
    assert _ds(tmp_path).resize == 4 and StreamedImageFolder(tmp_path, size=28).resize == 32  # round(size / 0.875)


@pytest.mark.parametrize("wide", [True, False])
def test_crop_is_centered(tmp_path: Path, wide: bool) -> None:
    """A 30x10 image whose halves differ: the 8x8 crop shows 4 columns (or rows) of each."""
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :15] = (255, 0, 0)
    arr[:, 15:] = (0, 0, 255)
    if not wide:
        arr = arr.transpose(1, 0, 2).copy()
    path = tmp_path / "train" / "a" / "h.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(arr).save(path)
    ds = _ds(tmp_path, size=8, resize=10, mean=(0, 0, 0), std=(1, 1, 1))
    x, _ = ds[0]
    if not wide:
        x = x.transpose(1, 2)
    red, blue = torch.tensor([1.0, 0, 0]).view(3, 1, 1), torch.tensor([0, 0, 1.0]).view(3, 1, 1)
    assert torch.allclose(x[:, :, :4], red.expand(3, 8, 4)) and torch.allclose(x[:, :, 4:], blue.expand(3, 8, 4))


def test_transform_argument_errors(tmp_path: Path) -> None:
    """A crop larger than the resize, bad mean/std, grey without mean/std, bad channels."""
    _img(tmp_path / "train" / "a" / "x.png")
    bad = [dict(size=12, resize=10), dict(size=0), dict(mean=(0.5, 0.5), std=STD), dict(mean=MEAN, std=(1, 0, 1)),
           dict(mean=MEAN, std=(1, -1, 1)), dict(channels=1), dict(channels=1, mean=MEAN, std=STD), dict(channels=2)]
    for kw in bad:
        with pytest.raises(UserError):
            StreamedImageFolder(tmp_path, **kw)


# --- bad images ---


def _bad_tree(root: Path) -> None:
    """Sorted: a/g0.png, a/g1.png, a/zero.png, b/g2.jpg, b/text.jpg, b/trunc.jpg."""
    _img(root / "train" / "a" / "g0.png", 1)
    _img(root / "train" / "a" / "g1.png", 2)
    (root / "train" / "a" / "zero.png").write_bytes(b"")
    _img(root / "train" / "b" / "g2.jpg", 3, fmt="JPEG")
    (root / "train" / "b" / "text.jpg").write_text("this is not a JPEG\n")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "train" / "b" / "trunc.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])


def test_bad_images_are_markers_and_are_skipped(tmp_path: Path) -> None:
    """Zero bytes, truncated and not-an-image files become BadImage; a pass skips them, same with workers."""
    _bad_tree(tmp_path)
    ds = _ds(tmp_path)
    bad_at = [2, 4, 5]
    for i in range(len(ds)):
        assert isinstance(ds[i], BadImage) == (i in bad_at)
    assert ds[2].item == 2 and ds[2].path == str(tmp_path / "train" / "a" / "zero.png") and ds[2].reason
    results = []
    for workers in (0, 2):
        sb = StreamedBatches(ds, 2, workers=workers)
        for _ in range(2):  # a second pass counts afresh
            got = list(sb)
            assert [len(y) for _, y in got] == [2, 1]  # the batch (text, trunc) is not yielded at all
            assert len(sb) == 3 and sb.skipped == 3
            assert sb.bad_paths == [str(ds.path(i)) for i in bad_at]
        results.append((torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1].tolist() == results[1][1].tolist() == [0, 0, 1]
    want = torch.stack([ds[i][0] for i in (0, 1, 3)])
    assert torch.equal(results[0][0], want)


# --- selection and shards ---


def test_classes_and_limit(tmp_path: Path) -> None:
    """classes= keeps those labels (ints or names), limit= the first N of them."""
    ds = _grid(tmp_path)
    labels = ds.labels
    assert StreamedBatches(ds, 4, classes=[0, "c"]).indices().tolist() == np.flatnonzero(labels != 1).tolist()
    assert StreamedBatches(ds, 4, classes=["b"], limit=2).indices().tolist() == [4, 5]
    assert StreamedBatches(ds, 4, limit=5).indices().tolist() == [0, 1, 2, 3, 4]
    y = torch.cat([b for _, b in StreamedBatches(ds, 3, classes=[2, 0])])
    assert y.tolist() == [0] * 4 + [2] * 4  # dataset order, labels not renumbered
    empty = StreamedBatches(ds, 4, limit=0)
    assert len(empty) == 0 and list(empty) == []
    with pytest.raises(UserError, match="Did you mean 'b'"):
        StreamedBatches(ds, 4, classes=["bb"])
    for wrong in ([3], [-1]):
        with pytest.raises(UserError, match="out of range"):
            StreamedBatches(ds, 4, classes=wrong)


def test_seeded_order(tmp_path: Path) -> None:
    """Same seed, same order; each pass (or set_epoch) another permutation of the same selection."""
    ds = _grid(tmp_path)
    sb = StreamedBatches(ds, 4, seed=3)
    first = sb.indices().tolist()
    assert first == StreamedBatches(ds, 4, seed=3).indices().tolist() != list(range(12))
    assert sorted(first) == list(range(12))
    assert first != StreamedBatches(ds, 4, seed=4).indices().tolist()
    passed = torch.cat([y for _, y in sb]).tolist()
    assert passed == ds.labels[first].tolist()
    second = sb.indices().tolist()  # the pass moved to the next epoch
    assert second != first and sorted(second) == list(range(12))
    sb.set_epoch(0)
    assert sb.indices().tolist() == first
    sb.set_epoch(1)
    assert sb.indices().tolist() == second
    assert StreamedBatches(ds, 4).indices().tolist() == list(range(12))  # no seed: sorted order


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("seed", [None, 5])
def test_shards_are_disjoint_and_cover_the_selection(tmp_path: Path, world: int, seed: int | None) -> None:
    """Every rank takes every world-th image of one permutation; len() counts the batches yielded."""
    ds = _grid(tmp_path, per_class=5)
    kw = dict(classes=["a", "c"], limit=9, seed=seed)
    whole = StreamedBatches(ds, 2, **kw).indices()
    assert len(whole) == 9 and set(ds.labels[whole].tolist()) == {0, 2}
    parts = []
    for rank in range(world):
        sb = StreamedBatches(ds, 2, shard=(rank, world), **kw)
        idx = sb.indices()
        assert idx.tolist() == whole[rank::world].tolist()  # the same permutation on every rank
        got = list(sb)
        assert len(got) == len(sb) and sum(len(y) for _, y in got) == len(idx) and sb.skipped == 0
        parts.append(idx.tolist())
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) and set(flat) == set(whole.tolist())
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_invalid_batch_arguments(tmp_path: Path) -> None:
    """Shard, batch_size, workers and limit out of range are UserErrors."""
    ds = _grid(tmp_path, "a", 2)
    for kw in (dict(shard=(2, 2)), dict(shard=(-1, 2)), dict(shard=(0, 0)), dict(workers=-1), dict(limit=-1)):
        with pytest.raises(UserError):
            StreamedBatches(ds, 2, **kw)
    with pytest.raises(UserError, match="batch_size"):
        StreamedBatches(ds, 0)


# --- streaming equals in-memory ---


def test_streamed_batches_equal_the_items_of_indices(tmp_path: Path) -> None:
    """Concatenated batches are exactly `dataset[i]` stacked for the indices of the pass."""
    ds = _grid(tmp_path)
    for kw in (dict(), dict(seed=1, shard=(1, 2), classes=[0, 2])):
        sb = StreamedBatches(ds, 3, **kw)
        idx = sb.indices().tolist()
        got = list(sb)
        assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 4, 4) and y.dtype == torch.int64 for x, y in got)
        assert torch.equal(torch.cat([x for x, _ in got]), torch.stack([ds[i][0] for i in idx]))
        assert torch.cat([y for _, y in got]).tolist() == [ds[i][1] for i in idx]
