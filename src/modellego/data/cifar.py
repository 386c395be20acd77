"""CIFAR-10 / CIFAR-100 in their official python-pickle format."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError, DataNotFoundError
from ._common import Arrays, RawData, cache_dir, check_arrays, download_file

log = logging.getLogger(__name__)

_URL = "https://www.cs.toronto.edu/~kriz/"
# name -> (folder in the archive, archive, archive MD5, train files, test file, meta file, label key, names key)
_LAYOUT: dict[str, tuple[str, str, str, tuple[str, ...], str, str, str, str]] = {
    "cifar10": (
        "cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", "labels", "label_names",
    ),
    "cifar100": (
        "cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), "test", "meta", "fine_labels", "fine_label_names",
    ),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as legacy
        return legacy
    return _reconstruct


# The only globals a CIFAR batch needs: numpy array reconstruction.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy array reconstruction."""

    def __init__(self, file: Any, source: str) -> None:
        # latin1 decodes the Python 2 strings of the official files, numpy data included.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED.get((module, name))
        if resolve is None:
            raise CorruptFileError(
                f"{self._source}: refusing to unpickle global {module}.{name}; a CIFAR batch holds only "
                "dicts, lists, strings and numpy arrays. Use the official files from "
                "https://www.cs.toronto.edu/~kriz/cifar.html."
            )
        return resolve()


def load_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Load a CIFAR python batch with the restricted unpickler; bytes keys become str."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, str(path)).load()
    except FileNotFoundError:
        raise DataNotFoundError(f"CIFAR file {path} does not exist; check the data folder.") from None
    except CorruptFileError:
        raise
    except Exception as exc:  # pickle raises many types on garbage input
        raise CorruptFileError(
            f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc}); delete it and get the dataset again."
        ) from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: expected a dict in the CIFAR pickle, found {type(obj).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _get(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise CorruptFileError(f"{path}: missing key {key!r}, found keys {sorted(batch)}.")
    return batch[key]


def _read_batch(path: Path, label_key: str, num_classes: int) -> Arrays:
    batch = load_pickle(path)
    data = np.asarray(_get(batch, "data", path))
    labels = np.asarray(_get(batch, label_key, path))
    if data.dtype != np.uint8 or data.size != len(data) * 3 * 32 * 32:
        raise CorruptFileError(
            f"{path}: expected uint8 'data' of shape (N, 3072), found {data.dtype} {data.shape}."
        )
    return check_arrays(data.reshape(-1, 3, 32, 32), labels, num_classes, str(path))


def _extract(archive: Path, folder_name: str) -> Path:
    """Extract `archive` next to itself; the folder appears only once complete."""
    parent = archive.parent
    with tempfile.TemporaryDirectory(dir=parent, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CorruptFileError(f"{archive}: cannot extract ({exc}); delete it and download again.") from None
        if not (Path(tmp) / folder_name).is_dir():
            raise CorruptFileError(f"{archive}: expected a {folder_name}/ folder inside, found none.")
        dest = parent / folder_name
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(Path(tmp) / folder_name, dest)
    return dest


def load_cifar(name: str, data_dir: Path | None, download: bool) -> RawData:
    """Load ``cifar10`` / ``cifar100`` from `data_dir` (else the cache), unpacking or downloading the archive."""
    folder, archive, md5, train_files, test_file, meta_file, label_key, names_key = _LAYOUT[name]
    required = (*train_files, test_file, meta_file)
    # With a data_dir everything happens there (downloads included), else in the cache.
    root = data_dir if data_dir is not None else cache_dir(name)
    candidates = [root / folder, root, root / name / folder]
    found = next((c for c in candidates if all((c / f).is_file() for f in required)), None)
    if found is None:  # an archive that was fetched but not unpacked
        tar = root / archive if (root / archive).is_file() else None
        if tar is None and download:
            tar = download_file([_URL + archive], root / archive, md5)
        if tar is not None:
            found = _extract(tar, folder)
    if found is None or not all((found / f).is_file() for f in required):
        searched = ", ".join(str(c) for c in candidates)
        raise DataNotFoundError(
            f"{name} not found: looked for {folder}/ with {', '.join(required)} in: {searched}. Pass a data_dir "
            f"(--data-dir) holding {folder}/ or {archive} from https://www.cs.toronto.edu/~kriz/cifar.html, "
            "or allow downloading (download=True, --download)."
        )

    log.info("loading %s from %s", name, found)
    num_classes = _NUM_CLASSES[name]
    meta_path = found / meta_file
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(load_pickle(meta_path), names_key, meta_path)]
    if len(names) != num_classes:
        raise CorruptFileError(f"{meta_path}: expected {num_classes} class names, found {len(names)}.")
    parts = [_read_batch(found / f, label_key, num_classes) for f in train_files]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_batch(found / test_file, label_key, num_classes)
    return RawData(tuple(names), train, test)
