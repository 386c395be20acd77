"""Helpers shared by the dataset readers: the cache folder, checked downloads, raw arrays."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import CorruptFileError, DataNotFoundError

log = logging.getLogger(__name__)

DATA_ENV = "MODELLEGO_DATA"
"""Environment variable that overrides the download cache folder."""

Arrays = tuple[np.ndarray, np.ndarray]
"""(images (N, C, H, W) uint8, labels (N,) int64)."""


class RawData(NamedTuple):
    """What a reader returns; `None` splits are carved from train by `load_dataset`."""

    classes: tuple[str, ...]
    train: Arrays
    test: Arrays | None = None
    val: Arrays | None = None


def cache_dir(name: str) -> Path:
    """Folder where dataset `name` is downloaded: ``$MODELLEGO_DATA/name`` or ``~/.cache/modellego/data/name``."""
    base = os.environ.get(DATA_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "modellego" / "data"
    return root / name


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(urls: Sequence[str], dest: Path, md5: str) -> Path:
    """Download the first URL that works to `dest`, checking its MD5.

    The file is written to a temporary name and moved into place only once its
    checksum matches, so an interrupted download never leaves a broken file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        log.info("downloading %s", url)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
            found = md5sum(Path(tmp))
            if found != md5:
                failures.append(f"{url}: MD5 {found}, expected {md5}")
                continue
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError) as exc:
            failures.append(f"{url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataNotFoundError(
        f"could not download {dest.name}: " + "; ".join(failures)
        + f". Check the network, or place the file at {dest} yourself."
    )


def check_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int, source: str) -> Arrays:
    """Validate reader output and return it as (uint8 NCHW, int64 labels)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CorruptFileError(
            f"{source}: expected uint8 images shaped (N, C, H, W), found {images.dtype} {images.shape}."
        )
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise CorruptFileError(
            f"{source}: found {len(images)} images but {len(labels)} labels; the files do not belong together."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptFileError(
            f"{source}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}."
        )
    return np.ascontiguousarray(images), labels
