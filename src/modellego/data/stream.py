"""Streamed image folders: ImageNet-sized sets read image by image, never held in memory.

Layout (the ImageNet / Tiny-ImageNet one)::

    root/train/<class>/**/*.JPEG|jpg|png     nested folders allowed (Tiny-ImageNet: <wnid>/images/)
    root/<class>/**/...                      when there is no train/ folder
    root/val/<class>/**/...                  val with one folder per class, or
    root/val/**/*.JPEG + a label file        flat val: val_annotations.txt (Tiny-ImageNet,
                                             ``filename<TAB>wnid<TAB>...``), labels.txt
                                             (``filename label``) or ``label_file=``

Classes are the sorted class-folder names of train (or ``classes=``); a label names a class, and
a label no class has is a `UserError` naming the file and line. Files are listed in sorted order,
so every run and every process sees the same indices. Only the paths and labels stay in memory,
about 50 bytes per ImageNet image (70 MB for 1.28M images), in a few numpy arrays rather than
1.28M Python objects, whose reference counts would make forked DataLoader workers copy them.

Each image is decoded lazily with Pillow (grey, RGBA and palette images become RGB, or every
image grey with ``channels=1``) and given
the standard evaluation transform: resize the shorter side to ``resize`` (default
``round(size / 0.875)``, 256 for 224) with antialiased bilinear filtering, center-crop to
``size``, scale to [0, 1] and normalise by mean/std, giving a (C, size, size) float32 tensor.

`StreamedBatches` wraps a `torch.utils.data.DataLoader` (``num_workers=workers``, no pinned
memory) and yields ``(images (B, C, H, W) float32, labels (B,) int64)``. The selection is made
in this order: ``classes=`` keeps those labels, ``limit=`` keeps the first N, ``seed=`` permutes
(the same permutation on every rank), and ``shard=(rank, world_size)`` keeps every
``world_size``-th image starting at ``rank``. Shards are disjoint and cover every selected image
exactly once; unlike `DistributedSampler` nothing is repeated to even them out, so shard sizes
differ by at most one (sum per-shard totals, don't average per-shard means).

Bad images (truncated, zero bytes, not an image) never stop a pass: ``__getitem__`` returns a
`BadImage` marker, the collate function drops it from the batch (which is then smaller, or not
yielded at all when empty), and the batch iterator, in the main process even with workers,
logs each bad path once and counts it in ``.skipped`` / ``.bad_paths``.
"""
from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..errors import DataNotFoundError, UserError
from .folder import _class_dirs, _pil_image
from .loader import num_batches

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
LABEL_FILES = ("val_annotations.txt", "labels.txt")
"""Label files a flat val/ (or test/) folder is searched for, in this order."""
SPLITS = ("train", "val", "test")
CROP_FRACTION = 0.875
"""Share of the resized shorter side that the center crop keeps (224 of 256)."""


class BadImage(NamedTuple):
    """What `StreamedImageFolder.__getitem__` returns for an image it cannot decode."""

    item: int
    path: str
    reason: str


class StreamBatch(NamedTuple):
    """One collated batch: the good images, their labels, and the samples that were dropped.

    Shape:
        images (B, C, H, W) float32 or None when every sample was bad; labels (B,) int64.
    """

    images: torch.Tensor | None
    labels: torch.Tensor
    bad: list[BadImage]


class _Paths:
    """Many relative paths as one utf-8 byte array plus offsets: two numpy objects, not N strings."""

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [p.encode("utf-8") for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


def _suffixes(extensions: Iterable[str]) -> frozenset[str]:
    out = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not out:
        raise UserError("extensions must name at least one file type, e.g. ('.jpeg', '.jpg', '.png').")
    return out


def _walk_images(folder: Path, suffixes: frozenset[str]) -> list[str]:
    """Sorted posix paths, relative to `folder`, of every image below it (hidden entries skipped)."""
    found: list[str] = []
    # os.walk, not Path.rglob: far fewer objects per file on a 1.28M-file tree. Symlinked
    # folders below `folder` are not followed (no loop detection); symlinked files are read.
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder).as_posix()
        prefix = "" if rel == "." else rel + "/"
        found += [prefix + f for f in filenames if not f.startswith(".") and os.path.splitext(f)[1].lower() in suffixes]
    return sorted(found)


def _unknown_class(where: str, name: str, classes: Sequence[str]) -> UserError:
    close = difflib.get_close_matches(name, classes, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return UserError(
        f"{where}: class {name!r} is not among the {len(classes)} train classes ({shown}).{hint} "
        "Labels must be class-folder names of train/ (or of classes=)."
    )


def eval_transform(
    image: Image,
    *,
    size: int,
    resize: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """The standard evaluation transform of one RGB or grey ("L") Pillow image.

    Resize the shorter side to `resize` (antialiased bilinear; the longer side is truncated to
    an int, as torchvision does), center-crop `size` x `size` (offsets rounded), scale to [0, 1],
    then ``(x - mean) / std``.

    Shape:
        mean, std (C, 1, 1); returns (C, size, size) float32, C = 3 for RGB, 1 for grey.
    """
    w, h = image.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=_pil_image().Resampling.BILINEAR)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    pixels = np.asarray(image, dtype=np.uint8)[top:top + size, left:left + size]  # (size, size, 3) or (size, size)
    pixels = pixels.reshape(size, size, -1)  # (size, size, C)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)  # (C, size, size); Pillow's array is read-only
    return (x - mean) / std


def _convert(image: Image, mode: str) -> Image:
    """`image` in `mode` ("RGB" or "L")."""
    if image.mode == mode:
        return image
    if image.mode == "P" and "transparency" in image.info:
        # Straight P -> RGB warns about byte transparency; going through RGBA is what Pillow asks for.
        image = image.convert("RGBA")
    return image.convert(mode)  # alpha is dropped, not composited: what ImageNet loaders do


class StreamedImageFolder(TorchDataset[Any]):
    """One split of an image folder, decoded image by image (see the module docstring for the layout).

    Args:
        root: the dataset folder (holding train/ and maybe val/, or the class folders directly).
        split: "train", "val" or "test".
        size: side of the square center crop.
        resize: the shorter side before cropping; default ``round(size / 0.875)``.
        channels: 3 decodes to RGB, 1 to grey.
        mean, std: per-channel normalisation; ImageNet's by default for RGB (grey needs them given).
        classes: class names in label order; default the sorted class folders of train.
        extensions: file suffixes read as images (case-insensitive).
        label_file: the label file of a flat val/ or test/ folder; default val_annotations.txt or
            labels.txt inside it. A relative path not found as given is looked up in the split folder.

    Items are ``(image (C, size, size) float32, label int)``, or a `BadImage` for an image that
    cannot be decoded; use `StreamedBatches` (or `collate_streamed`) to batch them.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        size: int = 224,
        resize: int | None = None,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        label_file: str | os.PathLike[str] | None = None,
    ) -> None:
        _pil_image()  # fail here, with the install hint, rather than in every worker
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"image folder {self.root} does not exist; pass a folder holding train/ or class folders.")
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, found {split!r}.")
        self.split = split
        self.size = int(size)
        self.resize = int(resize) if resize is not None else round(size / CROP_FRACTION)
        if self.size < 1 or self.resize < self.size:
            raise UserError(
                f"need 1 <= size <= resize so the center crop fits, found size={size}, resize={self.resize}."
            )
        if channels not in (1, 3):
            raise UserError(f"channels must be 3 (RGB) or 1 (grey), found {channels}.")
        self.channels = channels
        if mean is None or std is None:
            if channels != 3:
                raise UserError("grey images need mean= and std= (one value each); ImageNet's are for RGB.")
            mean = IMAGENET_MEAN if mean is None else mean
            std = IMAGENET_STD if std is None else std
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise UserError(f"mean and std need {channels} values each, std positive; found {tuple(mean)} and {tuple(std)}.")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
        self.suffixes = _suffixes(extensions)

        has_train = (self.root / "train").is_dir()
        train_dir = self.root / "train" if has_train else self.root
        if classes is None:
            if not has_train and split != "train":
                raise UserError(
                    f"{self.root}: no train/ folder to take the class names from; pass classes= for split {split!r}."
                )
            classes = _class_dirs(train_dir)
        self.classes = tuple(classes)
        if not self.classes:
            raise UserError(f"{train_dir}: expected one sub-folder per class, found none.")
        if len(set(self.classes)) != len(self.classes):
            raise UserError(f"classes must be distinct, found duplicates in {list(self.classes)[:10]}.")

        if split == "train":
            if label_file is not None:
                raise UserError("label_file= is for a flat val/ or test/ folder; train/ needs one folder per class.")
            self.folder = train_dir
            rel, labels = self._list_class_folders(train_dir)
        else:
            self.folder = self.root / split
            if not self.folder.is_dir():
                raise DataNotFoundError(f"{self.folder} does not exist; the split {split!r} needs that folder.")
            found = self._label_file(label_file)
            rel, labels = self._list_labelled(found) if found is not None else self._list_class_folders(self.folder)
        if not rel:
            raise UserError(f"{self.folder}: found no images with suffixes {sorted(self.suffixes)}.")
        # ~37 bytes of path + 8 of offset + 4 of label per ImageNet image; see the module docstring.
        self._paths = _Paths(rel)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.labels.flags.writeable = False
        log.info("streamed image folder %s: %d images, %d classes", self.folder, len(self), len(self.classes))

    def _list_class_folders(self, folder: Path) -> tuple[list[str], list[int]]:
        index = {c: i for i, c in enumerate(self.classes)}
        loose = [f.name for f in folder.iterdir()
                 if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in self.suffixes]
        if loose:
            raise UserError(
                f"{folder}: holds {len(loose)} images (e.g. {loose[0]}) outside class folders but no label file; "
                f"add one of {LABEL_FILES} or pass label_file=, or move the images into class folders."
            )
        rel: list[str] = []
        labels: list[int] = []
        for name in _class_dirs(folder):
            if name not in index:
                raise _unknown_class(str(folder / name), name, self.classes)
            files = _walk_images(folder / name, self.suffixes)
            if not files:
                log.warning("class folder %s holds no images; class %r gets none", folder / name, name)
            prefix = os.path.relpath(folder / name, self.root).replace(os.sep, "/") + "/"
            rel += [prefix + f for f in files]
            labels += [index[name]] * len(files)
        # Sorted paths: class folders sort before their files, so this is also class-name order.
        order = sorted(range(len(rel)), key=rel.__getitem__)
        return [rel[i] for i in order], [labels[i] for i in order]

    def _label_file(self, label_file: str | os.PathLike[str] | None) -> Path | None:
        if label_file is None:
            return next((self.folder / n for n in LABEL_FILES if (self.folder / n).is_file()), None)
        given = Path(label_file)
        for candidate in (given, self.folder / given):
            if candidate.is_file():
                return candidate
        raise DataNotFoundError(f"label file {given} not found (also looked for {self.folder / given}).")

    def _list_labelled(self, label_file: Path) -> tuple[list[str], list[int]]:
        """Images anywhere under the split folder, labelled by `label_file` lines ``name<TAB or space>class``."""
        index = {c: i for i, c in enumerate(self.classes)}
        files = _walk_images(self.folder, self.suffixes)
        by_rel = {f: i for i, f in enumerate(files)}
        by_name: dict[str, int] = {}
        for k, f in enumerate(files):  # a bare file name must name exactly one image (-1: several)
            base = f.rsplit("/", 1)[-1]
            by_name[base] = -1 if base in by_name else k
        labels = np.full(len(files), -1, dtype=np.int64)
        line_of: dict[int, int] = {}
        with open(label_file, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                # Tabs when there are any (Tiny-ImageNet; names may hold spaces), else whitespace.
                fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
                if not fields or not fields[0].strip():
                    continue
                where = f"{label_file}:{number}"
                if len(fields) < 2:
                    raise UserError(f"{where}: expected 'filename label', found {line.strip()!r}.")
                name, label = fields[0].strip().replace("\\", "/"), fields[1].strip()
                if label not in index:
                    raise _unknown_class(where, label, self.classes)
                at: int | None = by_rel.get(name)
                if at is None and "/" not in name:
                    at = by_name.get(name)
                if at is None or at < 0:
                    why = "names several images; give its path relative to" if at is not None else "is no image under"
                    raise UserError(f"{where}: {name!r} {why} {self.folder} (suffixes {sorted(self.suffixes)}).")
                if at in line_of:
                    raise UserError(f"{where}: {name!r} is labelled twice, also on line {line_of[at]}.")
                labels[at] = index[label]
                line_of[at] = number
        kept = np.flatnonzero(labels >= 0)
        if len(kept) < len(files):
            log.warning("%s: %d of %d images have no line in %s and are left out",
                        self.folder, len(files) - len(kept), len(files), label_file)
        return [os.path.relpath(self.folder / files[i], self.root).replace(os.sep, "/") for i in kept], labels[kept].tolist()

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> Path:
        """The file of image `index`."""
        return self.root / self._paths[index]

    def load(self, path: str | os.PathLike[str]) -> torch.Tensor:
        """Decode one file and apply the evaluation transform; raises on a bad image.

        Shape:
            returns (C, size, size) float32.
        """
        with _pil_image().open(path) as img:
            img.load()  # decode now, inside the caller's error handling, not lazily later
            image = _convert(img, "RGB" if self.channels == 3 else "L")
        return eval_transform(image, size=self.size, resize=self.resize, mean=self.mean, std=self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadImage:
        path = self.path(index)
        try:
            image = self.load(path)
        # Pillow's decoders fail in many ways on corrupt files (OSError, SyntaxError, struct.error,
        # DecompressionBombError, ...); one bad file among 1.28M must not end a pass.
        except Exception as exc:  # noqa: BLE001
            return BadImage(index, str(path), f"{type(exc).__name__}: {exc}")
        return image, int(self.labels[index])


def collate_streamed(samples: list[tuple[torch.Tensor, int] | BadImage]) -> StreamBatch:
    """DataLoader ``collate_fn``: stack the good samples, set the `BadImage` markers aside."""
    good = [s for s in samples if not isinstance(s, BadImage)]
    bad = [s for s in samples if isinstance(s, BadImage)]
    images = torch.stack([s[0] for s in good]) if good else None  # (B, C, H, W)
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)  # (B,)
    return StreamBatch(images, labels, bad)


def _default_shard() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StreamedBatches:
    """Re-iterable batches of ``(images (B, C, H, W) float32, labels (B,) int64)`` decoded on the fly.

    ``len()`` counts batches before bad images are dropped; a batch with a bad image is smaller,
    and one with only bad images is not yielded. After (or during) a pass, ``skipped`` and
    ``bad_paths`` say what that pass dropped.

    Args:
        dataset: the images.
        batch_size: samples per batch before bad images are dropped.
        workers: DataLoader worker processes (0 decodes in this process).
        shard: ``(rank, world_size)``: this process reads images ``rank, rank + world_size, ...`` of
            the selection, so shards are disjoint and together hold every image once (no padding).
            Default: torch.distributed's rank and world size when it is initialised, else everything.
        limit: keep the first `limit` images after the `classes` filter (before sharding).
        classes: keep only images of these labels (ints, or class names); labels are not renumbered.
        seed: None keeps the sorted order; an int permutes per pass, seeded by (seed, epoch). Every
            rank must pass the same seed for the shards to stay disjoint.
    """

    def __init__(
        self,
        dataset: StreamedImageFolder,
        batch_size: int,
        *,
        workers: int = 0,
        shard: tuple[int, int] | None = None,
        limit: int | None = None,
        classes: Sequence[int | str] | None = None,
        seed: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, found {batch_size}.")
        if workers < 0:
            raise UserError(f"workers must be >= 0, found {workers}.")
        if limit is not None and limit < 0:
            raise UserError(f"limit must be >= 0 or None, found {limit}.")
        if shard is not None and len(shard) != 2:
            raise UserError(f"shard must be (rank, world_size), found {shard!r}.")
        rank, world = shard if shard is not None else _default_shard()
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"shard must be (rank, world_size) with 0 <= rank < world_size, found {(rank, world)}.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = workers
        self.shard = (rank, world)
        self.seed = seed
        self.epoch = 0
        selected = np.arange(len(dataset))
        if classes is not None:
            selected = selected[np.isin(dataset.labels, self._label_ids(classes))]
        self.selected = selected[:limit] if limit is not None else selected
        self.skipped = 0
        self.bad_paths: list[str] = []
        self._logged: set[str] = set()

    def _label_ids(self, classes: Sequence[int | str]) -> list[int]:
        names = self.dataset.classes
        ids: list[int] = []
        for c in classes:
            if isinstance(c, str):
                if c not in names:
                    raise _unknown_class("classes=", c, names)
                ids.append(names.index(c))
            elif not 0 <= c < len(names):
                raise UserError(f"classes=: label {c} is out of range; the dataset has labels 0..{len(names) - 1}.")
            else:
                ids.append(int(c))
        return ids

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the permutation of `epoch` (only matters with a seed)."""
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """The dataset indices the next pass reads, in order: selection, permutation, then this shard."""
        order = self.selected
        if self.seed is not None:
            # Mix seed and epoch into one 63-bit seed; every rank computes the same permutation.
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (1 << 63))
            order = order[torch.randperm(len(order), generator=g).numpy()]
        rank, world = self.shard
        return order[rank::world]

    def __len__(self) -> int:
        rank, world = self.shard
        return num_batches(len(range(rank, len(self.selected), world)), self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices().tolist()
        self.epoch += 1
        self.skipped, self.bad_paths = 0, []
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.workers,
            collate_fn=collate_streamed, pin_memory=False,
        )
        for batch in loader:
            for bad in batch.bad:  # counted here, in the main process, whatever the workers
                self.skipped += 1
                self.bad_paths.append(bad.path)
                if bad.path not in self._logged:
                    self._logged.add(bad.path)
                    log.warning("skipping unreadable image %s (%s)", bad.path, bad.reason)
            if batch.images is not None:
                yield batch.images, batch.labels
