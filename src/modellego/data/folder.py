"""Image folders: one sub-folder per class, optionally under train/ val/ test/."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError, DataNotFoundError, UserError
from ._common import Arrays, RawData, check_arrays

log = logging.getLogger(__name__)

PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
NPY_SUFFIX = ".npy"
SPLIT_DIRS = ("train", "val", "test")


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise UserError(
            "reading PNG/JPEG images needs Pillow, which is not installed; run `pip install pillow`, "
            "or store the images as .npy arrays (H, W) or (H, W, C) of uint8."
        ) from None
    return Image


def _read_image(path: Path) -> np.ndarray:
    """One image as a (C, H, W) uint8 array with C in {1, 3}."""
    if path.suffix.lower() == NPY_SUFFIX:
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CorruptFileError(f"{path}: not a readable .npy array ({exc}).") from None
    else:
        image_mod = _pil_image()
        try:
            with image_mod.open(path) as img:
                grey = img.mode in ("1", "L", "I", "I;16", "F")
                arr = np.asarray(img.convert("L" if grey else "RGB"))
        except OSError as exc:
            raise CorruptFileError(f"{path}: not a readable image ({exc}).") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise CorruptFileError(
            f"{path}: expected a uint8 image shaped (H, W) or (H, W, 3), found {arr.dtype} {arr.shape}."
        )
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _image_files(folder: Path) -> list[Path]:
    suffixes = PIL_SUFFIXES | {NPY_SUFFIX}
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_split(folder: Path, classes: tuple[str, ...]) -> tuple[list[np.ndarray], list[int]]:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for name in _class_dirs(folder):
        if name not in classes:
            raise UserError(
                f"{folder / name}: class {name!r} is not among the train classes {list(classes)}; "
                "every class in val/ and test/ needs a folder in train/."
            )
        files = _image_files(folder / name)
        images += [_read_image(p) for p in files]
        labels += [classes.index(name)] * len(files)
    return images, labels


def _stack(images: list[np.ndarray], labels: list[int], classes: tuple[str, ...], source: Path) -> Arrays | None:
    if not images:
        return None
    if len({im.shape[0] for im in images}) > 1:  # mixed grey and colour: make all colour
        images = [np.repeat(im, 3, axis=0) if im.shape[0] == 1 else im for im in images]
    sizes = sorted({im.shape[1:] for im in images})
    if len(sizes) > 1:
        raise UserError(
            f"{source}: images must all have one size, found {len(sizes)} sizes ({sizes[:3]}...); "
            "resize them to a common size first."
        )
    return check_arrays(np.stack(images), np.asarray(labels), len(classes), str(source))


def load_image_folder(root: Path | None) -> RawData:
    """Read an image folder; splits it lacks are left None for `load_dataset` to carve.

    Files may be PNG/JPEG/... (read with Pillow) or ``.npy`` uint8 arrays.
    """
    if root is None:
        raise UserError("dataset 'imagefolder' needs data_dir (--data-dir): a folder with one sub-folder per class.")
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist; pass a folder with one sub-folder per class.")
    has_splits = (root / "train").is_dir()
    top = root / "train" if has_splits else root
    classes = tuple(_class_dirs(top))
    if not classes:
        raise UserError(f"{top}: expected one sub-folder per class, found none.")
    empty = [c for c in classes if not _image_files(top / c)]
    if empty:
        raise UserError(
            f"{top}: class folders {empty} hold no images (.png, .jpg, .npy, ...); add images or remove them."
        )
    if has_splits:
        parts = {
            s: _stack(*_read_split(root / s, classes), classes, root / s) if (root / s).is_dir() else None
            for s in SPLIT_DIRS
        }
    else:
        parts = {"train": _stack(*_read_split(root, classes), classes, root)}
    shapes = {p[0].shape[1:] for p in parts.values() if p is not None}
    if len(shapes) > 1:
        raise UserError(f"{root}: the splits hold images of different shapes {sorted(shapes)}; use one size.")
    log.info("read image folder %s: %d classes", root, len(classes))
    train = parts["train"]
    assert train is not None  # every class folder holds images, checked above
    return RawData(classes, train, parts.get("test"), parts.get("val"))
