"""DISC21 folder layout, image ids, and image loading that fails loudly and clearly.

A million-image run must not die (or silently learn from grey padding) at image 734,211 because one file
is truncated: :func:`load_image` decodes every pixel and raises :class:`ImageLoadError` naming the file,
and :func:`screen_decode` finds all such files up front so they can be skipped and counted.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from isc.formats.files import atomic_write
from isc.formats.pair_csv import read_ground_truth
from isc.formats.pairs import GroundTruth
from isc.formats.pixels import to_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "SPLITS",
    "SkippedImages",
    "Disc21Layout",
    "ImageFolderDataset",
    "ImageLoadError",
    "screen_quick",
    "find_images",
    "image_id",
    "list_images",
    "load_image",
    "screen_decode",
    "screen_for_training",
    "to_rgb",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
"""File suffixes (compared lower-case) that :func:`list_images` treats as images."""
SPLITS = ("references", "queries", "training")
MAX_IMAGE_PIXELS = 89_478_485
"""Pixel count above which :func:`load_image` refuses a file (Pillow's own decompression-bomb default)."""

_FIRST_FEW = 5


# --------------------------------------------------------------------------------------------------
# ids and folders


def image_id(path: str | os.PathLike[str]) -> str:
    """The DISC21 id of an image file: its name without the extension (``R000123.jpg`` -> ``R000123``)."""
    return Path(path).stem


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly in ``folder``, sorted by id; hidden files and other extensions are ignored.

    Two files with one id (``a.jpg`` and ``a.png``) are an error: ids must name exactly one image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a directory")
    with os.scandir(folder) as entries:
        named = [
            e
            for e in entries
            if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        ]
    paths = [Path(e.path) for e in named if e.is_file()]
    _warn_broken_links([Path(e.path) for e in named if e.is_symlink() and not e.is_file()], folder)
    ids = np.array([p.stem for p in paths], dtype=str) if paths else np.zeros(0, dtype="<U1")
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    clash = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if clash.size:
        shown = []
        for i in clash[:_FIRST_FEW]:
            same = [paths[j].name for j in order[(sorted_ids == sorted_ids[i])]]
            shown.append(f"{sorted_ids[i]} ({', '.join(sorted(same))})")
        raise ValueError(f"{folder}: {clash.size} image id(s) used by more than one file: {'; '.join(shown)}")
    return [paths[i] for i in order]


def find_images(root: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Every image file under ``root`` (sub-folders too if ``recursive``; hidden entries skipped), by path.

    For pools of source images (e.g. a photo collection in category folders, or pretraining images),
    where file names need not be unique ids. Raises ``FileNotFoundError`` when there is none.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    found: list[Path] = []
    broken: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                path = Path(dirpath) / f
                (broken if path.is_symlink() and not path.exists() else found).append(path)
    _warn_broken_links(broken, root)
    if not found:
        where = "under" if recursive else "directly in"
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) {where} {root}")
    return sorted(found)


def _warn_broken_links(links: list[Path], folder: Path) -> None:
    """A dangling symlink is a lost image, not a non-image: say so instead of dropping it silently."""
    if links:
        shown = ", ".join(p.name for p in sorted(links)[:_FIRST_FEW])
        log.warning(
            "%s: ignoring %d broken symbolic link(s) to missing images, e.g. %s", folder, len(links), shown
        )


@dataclass(frozen=True)
class Disc21Layout:
    """A DISC21-style dataset root: ``references/``, ``queries/``, optional ``training/`` and ground truth.

    File listings are cached per instance (listing a million files takes seconds); build a new layout if
    the folders change.
    """

    root: Path
    ground_truth_file: str = "ground_truth.csv"
    _listings: dict[str, list[Path]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        root = Path(self.root)
        object.__setattr__(self, "root", root)
        if not root.is_dir():
            raise FileNotFoundError(f"DISC21 root {root} does not exist or is not a directory")
        missing = [s for s in ("references", "queries") if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"DISC21 root {root} lacks the folder(s) {missing} (expected references/, queries/, "
                "optionally training/ and ground_truth.csv)"
            )

    @classmethod
    def from_root(
        cls, root: str | os.PathLike[str], ground_truth_file: str = "ground_truth.csv"
    ) -> Disc21Layout:
        return cls(Path(root), ground_truth_file)

    def has_split(self, split: str) -> bool:
        self._check_split(split)
        return (self.root / split).is_dir()

    def paths(self, split: str) -> list[Path]:
        """Image paths of ``split`` (``references``, ``queries`` or ``training``), sorted by id."""
        self._check_split(split)
        if split not in self._listings:
            if not (self.root / split).is_dir():
                raise FileNotFoundError(f"DISC21 root {self.root} has no {split}/ folder")
            self._listings[split] = list_images(self.root / split)
        return self._listings[split]

    def ids(self, split: str) -> list[str]:
        return [p.stem for p in self.paths(split)]

    @property
    def ground_truth_path(self) -> Path:
        return self.root / self.ground_truth_file

    def has_ground_truth(self) -> bool:
        return self.ground_truth_path.is_file()

    def ground_truth(self) -> GroundTruth:
        if not self.has_ground_truth():
            raise FileNotFoundError(
                f"DISC21 root {self.root} has no ground truth file {self.ground_truth_file}"
            )
        return read_ground_truth(self.ground_truth_path)

    def validate(self) -> None:
        """Check the listings (no clashing ids) and that every ground-truth id names an existing image."""
        query_ids = np.array(self.ids("queries"), dtype=str)
        reference_ids = np.array(self.ids("references"), dtype=str)
        if self.has_split("training"):
            self.paths("training")
        if not self.has_ground_truth():
            return
        gt = self.ground_truth()
        problems = []
        for name, wanted, present in (
            ("queries", gt.query_ids, query_ids),
            ("references", gt.reference_ids[gt.matched], reference_ids),
        ):
            missing = np.unique(wanted[~np.isin(wanted, present)])
            if missing.size:
                shown = ", ".join(missing[:_FIRST_FEW].tolist()) + (
                    ", ..." if missing.size > _FIRST_FEW else ""
                )
                problems.append(f"{missing.size} id(s) missing from {name}/: {shown}")
        if problems:
            raise ValueError(
                f"{self.ground_truth_path} names images that do not exist: " + "; ".join(problems)
            )

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# --------------------------------------------------------------------------------------------------
# image loading


class ImageLoadError(ValueError):
    """An image file that cannot be used: empty, not an image, truncated, corrupt or too large."""

    def __init__(self, path: str | os.PathLike[str], reason: str = "") -> None:
        super().__init__(f"{path}: {reason}" if reason else str(path))
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # survives pickling across DataLoader workers
        return type(self), (self.path, self.reason)


@functools.cache
def _warn_load_truncated() -> None:
    log.warning(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): truncated images may load padded "
        "with grey instead of raising ImageLoadError"
    )


def _decode(path: Path, max_pixels: int | None) -> Image.Image:
    """Open ``path`` and decode every pixel; any failure becomes an :class:`ImageLoadError`."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_load_truncated()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError(path, "file does not exist") from None
    except OSError as e:
        raise ImageLoadError(path, f"cannot read file ({e})") from e
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (no Pillow-readable format recognised)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"too large, refused as a possible decompression bomb ({e})") from None
    except Exception as e:  # any header-parsing failure means a corrupt file
        raise ImageLoadError(path, f"corrupt image header ({type(e).__name__}: {e})") from e
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageLoadError(
                path,
                f"too large: {width}x{height} pixels exceeds max_pixels={max_pixels} (decompression-bomb guard)",
            )
        try:
            image.load()
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error, ...
            raise ImageLoadError(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from e
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception as e:  # a broken EXIF block should not lose a readable image
            log.warning("%s: ignoring unreadable EXIF orientation (%s)", path, e)
            oriented = None
        return image.copy() if oriented is None or oriented is image else oriented


def load_image(path: str | os.PathLike[str], max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load any Pillow-readable image as RGB, upright (EXIF orientation applied) and fully decoded.

    Raises :class:`ImageLoadError` naming the file and the problem for missing, empty, non-image,
    truncated, corrupt or oversized (more than ``max_pixels``) files.
    """
    path = Path(path)
    image = _decode(path, max_pixels)
    try:
        return to_rgb(image)
    except Exception as e:  # e.g. a mode Pillow cannot convert
        raise ImageLoadError(path, f"cannot convert mode {image.mode} to RGB ({e})") from e


def _problem(path: Path, max_pixels: int | None) -> str | None:
    try:
        load_image(path, max_pixels)
    except ImageLoadError as e:
        return e.reason
    return None


def screen_decode(
    paths: Sequence[str | os.PathLike[str]],
    skip_bad: bool = True,
    num_workers: int = 0,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Fully decode every image once; return ``(good_paths, [(bad_path, reason), ...])`` in input order.

    With ``skip_bad=False`` the first bad file raises :class:`ImageLoadError` instead. Decoding is slow
    (a few ms per image); ``num_workers`` threads help because Pillow releases the GIL while decoding.
    """
    files = [Path(p) for p in paths]
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            problems = list(pool.map(_problem, files, [max_pixels] * len(files)))
    else:
        problems = [_problem(p, max_pixels) for p in files]
    bad = [(p, reason) for p, reason in zip(files, problems, strict=True) if reason is not None]
    if bad and not skip_bad:
        raise ImageLoadError(*bad[0])
    if bad:
        shown = "; ".join(f"{p}: {r}" for p, r in bad[:_FIRST_FEW])
        log.warning("skipping %d of %d unreadable image(s): %s", len(bad), len(files), shown)
    good = [p for p, reason in zip(files, problems, strict=True) if reason is None]
    return good, bad


# --------------------------------------------------------------------------------------------------
# the pre-pass: cheap checks of every file before any extraction or training

_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_TAIL_BYTES = 4096  # an end marker may be followed by padding or a camera's trailer
_BAD_ID = re.compile(r"[\s,\"']")


def _quick_problem(path: Path, max_pixels: int | None) -> str | None:
    """Header and end-of-file checks (well under a millisecond per file); decode only what looks wrong.

    Catches missing, empty, non-image, oversized and truncated JPEG/PNG files; damage in the middle of
    the pixel data is found only when the image is decoded.
    """
    try:
        size = path.stat().st_size
        with Image.open(path) as image:
            image_format, (width, height) = image.format, image.size
    except Exception:  # any failure: let the full decoder say exactly what is wrong
        return _problem(path, max_pixels)
    if size == 0 or (max_pixels is not None and width * height > max_pixels):
        return _problem(path, max_pixels)
    marker = _END_MARKERS.get(image_format or "")
    if marker is not None:
        with open(path, "rb") as f:
            f.seek(max(0, size - _TAIL_BYTES))
            if marker not in f.read():
                return _problem(path, max_pixels)  # no end marker: truncated, unless it decodes
    return None


def screen_quick(
    paths: Sequence[str | os.PathLike[str]],
    what: str,
    *,
    skip_bad: bool = False,
    ids: bool = True,
    num_workers: int = 8,
    progress: bool = True,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The pre-pass every task runs before heavy work: ``(good_paths, [(bad_path, reason), ...])``.

    With ``ids``, file names must make valid ids (the official CSV and HDF5 formats hold ASCII without
    whitespace, commas or quotes): a bad name is always an error naming the file. Unreadable files (see
    :func:`_quick_problem`) are an error listing them, or with ``skip_bad`` dropped and returned.
    ``what`` names the files in messages (e.g. ``"training/ of /data/disc21"``).
    """
    files = [Path(p) for p in paths]
    bad_names = [p for p in files if ids and (not p.stem.isascii() or _BAD_ID.search(p.stem))]
    if bad_names:
        shown = ", ".join(repr(p.name) for p in bad_names[:_FIRST_FEW])
        raise ValueError(
            f"{len(bad_names)} file name(s) in {what} cannot be image ids: {shown}. Ids (file names "
            "without extension) must be ASCII without whitespace, commas or quotes, as the official "
            f"CSV and HDF5 formats require: rename them (e.g. {bad_names[0].parent})"
        )
    with ThreadPoolExecutor(max(1, num_workers)) as pool:  # Pillow and file reads release the GIL
        problems = list(
            tqdm(
                pool.map(_quick_problem, files, [max_pixels] * len(files)),
                total=len(files),
                desc=f"checking {what}",
                unit="image",
                disable=not progress or len(files) < 1000,
                leave=False,
            )
        )
    bad = [(p, r) for p, r in zip(files, problems, strict=True) if r is not None]
    if bad and not skip_bad:
        shown = "; ".join(f"{p.name}: {r}" for p, r in bad[:_FIRST_FEW])
        raise ImageLoadError(
            bad[0][0],
            f"{bad[0][1]}. {len(bad)} of {len(files)} images in {what} cannot be read ({shown}): "
            "fix or remove them, or set dataset.skip_bad_images=true to skip and count them",
        )
    if bad:
        log.warning("%s: skipping %d of %d unreadable image(s)", what, len(bad), len(files))
    good = [p for p, r in zip(files, problems, strict=True) if r is None]
    return good, bad


def screen_for_training(
    paths: Sequence[str | os.PathLike[str]], what: str, *, skip_bad: bool, num_workers: int = 8
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Training images a run can use: the pre-pass, then with ``skip_bad`` a full decode of the rest.

    Without ``skip_bad`` a file the pre-pass finds unreadable stops the run before training (one
    corrupt mid-file would still fail when loaded); with it, nothing unreadable reaches an epoch.
    """
    good, bad = screen_quick(paths, what, skip_bad=skip_bad, ids=False, num_workers=num_workers)
    if skip_bad:
        good, more = screen_decode(good, skip_bad=True, num_workers=num_workers)
        bad += more
    return good, bad


@dataclass
class SkippedImages:
    """What a skip-and-count run left out, kept as ``split,path,reason`` rows in a CSV in the run dir.

    The file is rewritten (atomically) each time files are added, so it is complete even if the run
    dies later.
    """

    path: Path
    rows: list[tuple[str, Path, str]] = field(default_factory=list)

    def add(self, split: str, bad: Sequence[tuple[Path, str]]) -> None:
        if not bad:
            return
        self.rows += [(split, Path(p), reason) for p, reason in bad]
        with atomic_write(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("split", "path", "reason"))
            writer.writerows((split, str(p), reason) for split, p, reason in self.rows)

    def count(self, split: str) -> int:
        return sum(1 for s, _, _ in self.rows if s == split)


class ImageFolderDataset(Dataset):
    """Images given by path, returned as ``(transform(image), index)``; ``ids[index]`` is the image id.

    ``skip_bad=False`` (default): a bad image raises :class:`ImageLoadError` when it is loaded.
    ``skip_bad=True``: every image is decoded once at construction (:func:`screen_decode`), bad ones are
    dropped and kept in ``skipped`` as ``(path, reason)``; indices refer to the remaining images.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        ids: Sequence[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_bad: bool = False,
        num_workers: int = 0,
    ) -> None:
        files = [Path(p) for p in paths]
        names = [p.stem for p in files] if ids is None else [str(i) for i in ids]
        if len(names) != len(files):
            raise ValueError(f"{len(files)} paths but {len(names)} ids")
        self.skipped: list[tuple[Path, str]] = []
        if skip_bad:
            good, self.skipped = screen_decode(files, skip_bad=True, num_workers=num_workers)
            keep = set(good)
            names = [i for p, i in zip(files, names, strict=True) if p in keep]
            files = [p for p in files if p in keep]
        self.paths = files
        self.ids = names
        self.transform = transform

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        skip_bad: bool = False,
        num_workers: int = 0,
    ) -> ImageFolderDataset:
        """All images of ``folder`` (see :func:`list_images`), ids from file names."""
        return cls(list_images(folder), transform=transform, skip_bad=skip_bad, num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_image(self.paths[index])
        return (self.transform(image) if self.transform is not None else image), index
