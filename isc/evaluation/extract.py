"""The one extraction engine: image files -> views -> descriptors at every scale, through one shard cache.

Every task that turns images into descriptors goes through :func:`extract`: ``task=evaluate`` and
``task=predict`` (one whole-image view per image at one scale), D2LV's test stage (query views, reference
crops, several scales; :mod:`isc.evaluation.inference`), the per-epoch retrieval callback and the benches.
One dataset (:class:`ViewDataset`), one loop, one cache layout and one array type
(:class:`ViewDescriptors`), so a fix or a speed-up lands everywhere at once.

Shards: with a ``cache_dir``, the images are cut into consecutive shards of ``shard_size`` images (rounded
up to a whole number of batches, so batch boundaries, hence the bytes, match an uninterrupted run). Each
shard is one file, ``cache_dir/<key>/<name>/shard-00000.h5``, written atomically as soon as it is done and
read back by a rerun whose fingerprints match (:mod:`isc.evaluation.shards`). Shards are independent files
indexed by position, so several processes each compute their share of one listing
(:func:`extract_share`: shards ``rank``, ``rank + world``, ...) and one of them then reads it whole.

On the CPU a convolutional model is fed ``channels_last`` batches (faster oneDNN kernels; the layout is
part of the cache key), the forward's large freed buffers are kept for the next batch instead of being
unmapped and faulted in again, and each DataLoader worker runs one torch and one OpenCV thread
(docs/performance.md measures all three).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

from isc.data.images import load_image
from isc.evaluation.families import ImagePrep
from isc.evaluation.shards import (
    SHARD_FORMAT,
    default_name,
    listing_fingerprint,
    model_fingerprint,
    read_shard,
    shard_directory,
    stable_repr,
    sweep_stale_temps,
    write_shard,
)
from isc.evaluation.views import View, apply_view

__all__ = [
    "Listing",
    "ViewDataset",
    "ViewDescriptors",
    "ViewsOf",
    "eval_transform",
    "extract",
    "extract_share",
    "resolve_device",
    "whole_image",
]

log = logging.getLogger(__name__)

ViewsOf = Callable[[Image.Image], list[View]]
"""What views an image gets: a function of the image (query views, reference crops, the whole image)."""

DEFAULT_SHARD_SIZE = 10_000


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` picks CUDA when present, so the same config runs on a laptop and a GPU node."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to a square ``image_size`` and scale to [0, 1]: the model normalises its own inputs."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


def whole_image(image: Image.Image) -> list[View]:
    """The view every global descriptor uses: the whole frame."""
    return [View("original", (0, 0, image.width, image.height))]


class ViewDataset(Dataset):
    """Each image's views at every scale: ``([tensor (n_views, 3, s, s) per scale], views, size, s, index)``.

    ``views`` is a function of the image, or the views of every image computed before (a second model
    of an ensemble reuses the first one's instead of running the detectors again). ``prepare`` changes
    each view's crop before it is resized (a model family's grey or blur, :mod:`isc.evaluation.families`);
    the views are found on the unchanged image.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        scales: Sequence[int],
        views: ViewsOf | Sequence[list[View]],
        prepare: ImagePrep | None = None,
    ) -> None:
        self.paths, self.views, self.prepare = list(paths), views, prepare
        self.transforms = [eval_transform(s) for s in scales]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], list[View], tuple[int, int], float, int]:
        image = load_image(self.paths[index])
        started = time.perf_counter()
        views = self.views(image) if callable(self.views) else self.views[index]
        view_seconds = time.perf_counter() - started if callable(self.views) else 0.0
        crops = [apply_view(image, v) for v in views]
        if self.prepare is not None:
            crops = [self.prepare(c) for c in crops]
        tensors = [torch.stack([t(c) for c in crops]) for t in self.transforms]
        return tensors, views, image.size, view_seconds, index


def _collate(
    batch: list,
) -> tuple[list[torch.Tensor], list[list[View]], list[tuple[int, int]], float, list[int]]:
    n_scales = len(batch[0][0])
    return (
        [torch.cat([b[0][s] for b in batch]) for s in range(n_scales)],
        [b[1] for b in batch],
        [b[2] for b in batch],
        sum(b[3] for b in batch),
        [b[4] for b in batch],
    )


@dataclass
class ViewDescriptors:
    """Descriptors of every view of every image, the one array type extraction returns.

    ``per_scale[s]`` is (n_rows, d) float32, one row per view; ``owner`` (n_rows,) the image index of
    each row; ``views[i]`` the views of image ``i``; ``sizes`` (n_images, 2) width and height;
    ``model_seconds`` (n_scales,) forward time per scale; ``view_seconds`` time spent finding views.
    """

    ids: np.ndarray
    per_scale: list[np.ndarray]
    owner: np.ndarray
    views: list[list[View]]
    sizes: np.ndarray
    model_seconds: np.ndarray
    view_seconds: float = 0.0

    @property
    def vectors(self) -> np.ndarray:
        """The first scale's rows: one descriptor per image for a whole-image extraction."""
        return self.per_scale[0]

    @classmethod
    def concat(cls, parts: Sequence[ViewDescriptors]) -> ViewDescriptors:
        """Parts of one listing, in order, as one (owners renumbered)."""
        offsets = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
        n_scales = min(len(p.per_scale) for p in parts)
        return cls(
            np.concatenate([p.ids for p in parts]),
            [np.concatenate([p.per_scale[s] for p in parts]) for s in range(n_scales)],
            np.concatenate([p.owner + o for p, o in zip(parts, offsets, strict=True)]),
            [vs for p in parts for vs in p.views],
            np.concatenate([p.sizes for p in parts]).reshape(-1, 2),
            np.sum([p.model_seconds for p in parts], axis=0),
            float(sum(p.view_seconds for p in parts)),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The shard layout: ``vectors`` (first scale) and ``image_names`` per row, as the official
        per-split files hold them, plus the other scales and the views."""
        flat = [v for vs in self.views for v in vs]
        return {
            "vectors": self.per_scale[0],
            **{f"vectors_{s}": x for s, x in enumerate(self.per_scale) if s},
            "image_names": np.array([str(self.ids[o]).encode("utf-8") for o in self.owner], dtype=bytes),
            "ids": np.array([str(i).encode("utf-8") for i in self.ids], dtype=bytes),
            "owner": self.owner.astype(np.int64),
            "view_kind": np.array([v.kind for v in flat], dtype="S16"),
            "view_box": np.array([v.box for v in flat], dtype=np.int64).reshape(-1, 4),
            "view_rotation": np.array([v.rotation for v in flat], dtype=np.int64),
            "views_per_image": np.array([len(vs) for vs in self.views], dtype=np.int64),
            "sizes": np.asarray(self.sizes, dtype=np.int64).reshape(-1, 2),
            "model_seconds": np.asarray(self.model_seconds, dtype=np.float64),
            "view_seconds": np.array(self.view_seconds),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> ViewDescriptors:
        flat = [
            View(kind.decode(), tuple(int(c) for c in box), int(rot))  # type: ignore[arg-type]
            for kind, box, rot in zip(a["view_kind"], a["view_box"], a["view_rotation"], strict=True)
        ]
        ends = np.cumsum(a["views_per_image"])
        n_scales = len(a["model_seconds"])
        return cls(
            np.array([bytes(b).decode("utf-8") for b in a["ids"]]),
            [a["vectors"]] + [a[f"vectors_{s}"] for s in range(1, n_scales)],
            a["owner"],
            [flat[end - n : end] for n, end in zip(a["views_per_image"], ends, strict=True)],
            a["sizes"],
            a["model_seconds"],
            float(a["view_seconds"]),
        )


def _views_key(views: ViewsOf | Sequence[list[View]]) -> str:
    """What decides the views: the function and its settings, or the precomputed views themselves."""
    if callable(views):
        return stable_repr(views)
    return hashlib.sha256(repr([[dataclasses.astuple(v) for v in vs] for vs in views]).encode()).hexdigest()


def _usable_cpus() -> int:
    """The CPUs this process may run on: a container's or ``taskset``'s share, not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _init_worker(_: int) -> None:
    """A DataLoader worker decodes and resizes one image at a time: one thread per library, or each of
    the workers would start a pool as large as the machine next to the model's own threads."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _forward_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """The layout the batches are fed in: ``channels_last`` to a convolutional model on the CPU.

    oneDNN's NHWC convolutions are faster there (EfficientNet-Lite0 at 224 px, batch 32, on 2 cores:
    about 1.5x, docs/performance.md); a channels-last input alone selects them (measured: the same speed
    and bytes as converting the weights too), so the caller's model is left as it is. The descriptors
    differ from a contiguous forward by float32 rounding (below 1e-6).
    """
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return torch.channels_last
    return torch.contiguous_format


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc <malloc.h>


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (whose ``mallopt`` settings :func:`_reuse_freed_memory` changes)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def _reuse_freed_memory(device: torch.device) -> Iterator[None]:
    """Keep the forward's freed activations in the heap for the next batch instead of unmapping them.

    glibc serves blocks over 32 MB with a fresh ``mmap`` and gives them back on ``free``; a CPU forward
    of a batch of 32 at 224 px allocates several of them (a 96-channel 112x112 map is 154 MB), so every
    batch faulted its ~3 GB of activations in page by page again: on 2 cores, nearly as much system
    time as user time (docs/performance.md). Inside this block large blocks come from the heap, which is not
    trimmed; on the way out glibc's usual settings are restored (at the values its adaptive threshold
    reaches after the first large free: 32 MB, trim at 64 MB) and the free heap is returned.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
        libc.malloc_trim(0)


@torch.no_grad()
def _run(
    model: nn.Module,
    paths: Sequence[Path],
    ids: Sequence[str],
    scales: Sequence[int],
    views: ViewsOf | Sequence[list[View]],
    images_per_batch: int,
    num_workers: int,
    device: torch.device,
    bar: Any,
    prepare: ImagePrep | None = None,
) -> ViewDescriptors:
    """The loop: every view of ``paths`` at every scale, checked row by row (a bad row names its image)."""
    workers = min(num_workers, _usable_cpus())
    if workers:
        # a forked worker cannot tear down a thread pool OpenCV started in this process (its threads are
        # not copied): _init_worker's setNumThreads(1) would wait on them for ever. Stop it here first.
        cv2.setNumThreads(1)
    loader = DataLoader(
        ViewDataset(paths, scales, views, prepare),
        batch_size=images_per_batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate,
        worker_init_fn=_init_worker if workers else None,
    )
    layout = _forward_memory_format(model, device)
    per_scale: list[list[np.ndarray]] = [[] for _ in scales]
    all_views: list[list[View]] = []
    sizes: list[tuple[int, int]] = []
    owner: list[np.ndarray] = []
    model_seconds = np.zeros(len(scales))
    view_seconds = 0.0
    with _reuse_freed_memory(device):
        for tensors, batch_views, batch_sizes, seconds, indices in loader:
            rows = np.concatenate(
                [np.full(len(v), i, dtype=np.int64) for v, i in zip(batch_views, indices, strict=True)]
            )
            for s, x in enumerate(tensors):
                started = time.perf_counter()
                x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
                out = model(x).float().cpu().numpy()
                model_seconds[s] += time.perf_counter() - started
                _refuse_bad_rows(out, rows, paths)
                per_scale[s].append(out)
            all_views += batch_views
            sizes += batch_sizes
            owner.append(rows)
            view_seconds += seconds
            bar.update(len(indices))
    if not owner:  # no images: empty arrays, not a concatenation error
        return ViewDescriptors(
            np.asarray(ids, dtype=str),
            [np.zeros((0, 0), np.float32) for _ in scales],
            np.zeros(0, np.int64),
            [],
            np.zeros((0, 2), np.int64),
            model_seconds,
        )
    return ViewDescriptors(
        np.asarray(ids),
        [np.concatenate(p).astype(np.float32, copy=False) for p in per_scale],
        np.concatenate(owner),
        all_views,
        np.array(sizes, dtype=np.int64).reshape(-1, 2),
        model_seconds,
        view_seconds,
    )


def _refuse_bad_rows(out: np.ndarray, rows: np.ndarray, paths: Sequence[Path]) -> None:
    """A non-finite or all-zero descriptor silently poisons the search: stop, naming the image."""
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise ValueError(f"non-finite descriptor for image {paths[int(rows[np.flatnonzero(bad)[0]])]}")
    zero = ~out.any(axis=1)
    if zero.any():
        raise ValueError(
            f"all-zero descriptor for image {paths[int(rows[np.flatnonzero(zero)[0]])]}: it would match "
            "nothing (a collapsed model, or an input or view too small for the backbone?)"
        )


@dataclass(frozen=True)
class Listing:
    """One call of the engine as data, so that a task can say what it will extract before it does: the
    processes of a group each take their share of it (:func:`extract_share`), then one reads it whole."""

    paths: Sequence[Path]
    scales: Sequence[int]
    views: ViewsOf | Sequence[list[View]] = whole_image
    views_per_image: int = 1
    name: str | None = None
    desc: str = "descriptors"
    prepare: ImagePrep | None = None

    def arguments(self) -> dict[str, Any]:
        return {
            "scales": self.scales,
            "views": self.views,
            "views_per_image": self.views_per_image,
            "name": self.name,
            "desc": self.desc,
            "prepare": self.prepare,
        }

    def extract(self, model: nn.Module, **engine: Any) -> ViewDescriptors:
        """:func:`extract` of this listing with the engine's settings (batch size, device, cache, ...)."""
        return extract(model, self.paths, **engine, **self.arguments())

    def extract_share(self, model: nn.Module, *, rank: int, world: int, **engine: Any) -> None:
        """:func:`extract_share` of this listing: process ``rank`` of ``world``'s shards of it."""
        extract_share(model, self.paths, rank=rank, world=world, **engine, **self.arguments())


def extract(
    model: nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    *,
    scales: Sequence[int],
    ids: Sequence[str] | None = None,
    views: ViewsOf | Sequence[list[View]] = whole_image,
    views_per_image: int = 1,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str | torch.device | None = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    name: str | None = None,
    progress: bool = True,
    desc: str = "descriptors",
    prepare: ImagePrep | None = None,
) -> ViewDescriptors:
    """Descriptors of every view of every image of ``paths`` at every scale of ``scales``.

    ``ids`` default to the file stems. A batch holds ``batch_size // views_per_image`` images (at least
    one), so a batch of query views costs about what a batch of whole images does. ``cache_dir=None``
    keeps nothing; otherwise see the module docstring: a shard whose file matches the model, these
    settings and its images' paths, sizes and mtimes is read back instead of computed. ``name`` names
    the listing's folder under the key (default: the images' folder plus a short hash of its path).
    ``prepare`` changes every view before it is resized (a model family's, part of the cache key).
    """
    result = _extract(
        model,
        paths,
        scales=scales,
        ids=ids,
        views=views,
        views_per_image=views_per_image,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        cache_dir=cache_dir,
        shard_size=shard_size,
        name=name,
        progress=progress,
        desc=desc,
        prepare=prepare,
    )
    assert result is not None
    return result


def extract_share(
    model: nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    *,
    rank: int,
    world: int,
    cache_dir: str | os.PathLike[str],
    **options: Any,
) -> None:
    """Process ``rank`` of ``world``'s share of :func:`extract` with the same ``options``: shards ``rank``,
    ``rank + world``, ... computed into ``cache_dir`` (those already there and valid are kept). Once
    every process is done, :func:`extract` reads the whole listing back without computing anything."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} processes")
    _extract(model, paths, cache_dir=cache_dir, share=(rank, world), **options)


def _extract(
    model: nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    *,
    scales: Sequence[int],
    ids: Sequence[str] | None = None,
    views: ViewsOf | Sequence[list[View]] = whole_image,
    views_per_image: int = 1,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str | torch.device | None = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    name: str | None = None,
    progress: bool = True,
    desc: str = "descriptors",
    share: tuple[int, int] | None = None,
    prepare: ImagePrep | None = None,
) -> ViewDescriptors | None:
    files = [Path(p) for p in paths]
    names = [p.stem for p in files] if ids is None else [str(i) for i in ids]
    if len(names) != len(files):
        raise ValueError(f"{len(files)} paths but {len(names)} ids")
    if not scales or min(scales) < 1:
        raise ValueError(f"scales must be a non-empty list of sizes, got {list(scales)}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    per_batch = max(1, batch_size // max(1, views_per_image))
    dev = resolve_device(device)
    model = model.to(dev).eval()
    precomputed = not callable(views)
    if precomputed and len(views) != len(files):  # type: ignore[arg-type]
        raise ValueError(f"{len(views)} precomputed view lists for {len(files)} images")  # type: ignore[arg-type]
    bar = tqdm(total=len(files), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if cache_dir is None or not files:
            if share is not None:
                return None  # no cache to share through (a share of nothing is done)
            return _run(model, files, names, scales, views, per_batch, num_workers, dev, bar, prepare)
        return _through_cache(
            model,
            files,
            names,
            scales,
            views,
            per_batch,
            num_workers,
            dev,
            bar,
            Path(cache_dir),
            shard_size,
            name,
            share,
            prepare,
        )
    finally:
        bar.close()


def _through_cache(
    model: nn.Module,
    files: list[Path],
    names: list[str],
    scales: Sequence[int],
    views: ViewsOf | Sequence[list[View]],
    per_batch: int,
    num_workers: int,
    dev: torch.device,
    bar: Any,
    cache_dir: Path,
    shard_size: int,
    name: str | None,
    share: tuple[int, int] | None = None,
    prepare: ImagePrep | None = None,
) -> ViewDescriptors | None:
    """The shards of the listing: each read back if valid, else computed and written. With ``share``
    (rank, world), only this rank's shards, and nothing is returned."""
    shard_size = -(-shard_size // per_batch) * per_batch
    precomputed = not callable(views)
    settings: dict[str, Any] = {
        "format": SHARD_FORMAT,
        "model": model_fingerprint(model),
        "scales": list(scales),
        "transform": stable_repr(eval_transform(0)) + ("" if prepare is None else f" after {prepare!r}"),
        "views": "precomputed" if precomputed else _views_key(views),
        "images_per_batch": per_batch,
        "shard_size": shard_size,
        "device": dev.type if dev.type != "cuda" else f"cuda:{torch.cuda.get_device_name(dev)}",
        "memory_format": str(_forward_memory_format(model, dev)),
        "torch": torch.__version__,
    }
    directory = shard_directory(cache_dir, settings, name or default_name(files))
    directory.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(directory)
    settings_json = json.dumps(settings, sort_keys=True, default=str)
    n_shards = -(-len(files) // shard_size)
    parts: list[ViewDescriptors] = []
    one_row_per_image = views is whole_image
    out: list[np.ndarray] | None = None
    reused = reused_images = computed = 0
    mine = range(n_shards) if share is None else range(share[0], n_shards, share[1])
    if share is not None:
        bar.reset(total=sum(min(shard_size, len(files) - s * shard_size) for s in mine))
    for s in mine:
        start, stop = s * shard_size, min((s + 1) * shard_size, len(files))
        shard_views = views[start:stop] if precomputed else views  # type: ignore[index]
        attrs = {
            "format": SHARD_FORMAT,
            "model": settings["model"],
            "settings": settings_json,
            "listing": listing_fingerprint(
                files[start:stop],
                image_size=None,
                extra={"settings": settings_json, "views": _views_key(shard_views) if precomputed else ""},
            ),
        }
        path = directory / f"shard-{s:05d}.h5"
        arrays = read_shard(path, attrs, names[start:stop])
        if arrays is not None:
            part = ViewDescriptors.from_arrays(arrays)
            reused += 1
            reused_images += stop - start
            bar.update(stop - start)
        else:
            part = _run(
                model,
                files[start:stop],
                names[start:stop],
                scales,
                shard_views,
                per_batch,
                num_workers,
                dev,
                bar,
                prepare,
            )
            write_shard(path, attrs, part.to_arrays())
            computed += 1
        if share is not None:  # the share is on disk: the reader assembles the listing
            bar.set_postfix(reused=f"{reused}/{reused + computed} shards")
            continue
        if one_row_per_image:  # fill the result in place: no second copy of a million descriptors
            if out is None:
                out = [np.empty((len(files), x.shape[1]), np.float32) for x in part.per_scale]
            for o, x in zip(out, part.per_scale, strict=True):
                if x.shape[1] != o.shape[1]:
                    raise ValueError(f"shard {path} has dimension {x.shape[1]}, others {o.shape[1]}")
                o[start:stop] = x
            part.per_scale = []
        parts.append(part)
        bar.set_postfix(reused=f"{reused}/{s + 1} shards")
    if share is not None:
        log.info(
            "%s: rank %d of %d computed %d and kept %d of its %d shards in %s",
            name or "images",
            share[0],
            share[1],
            computed,
            reused,
            len(mine),
            directory,
        )
        return None
    log.info(
        "%s: reused %d of %d shards (%d images) from %s",
        name or "images",
        reused,
        n_shards,
        reused_images,
        directory,
    )
    result = ViewDescriptors.concat(parts)
    if out is not None:
        result.per_scale = out
    return result
