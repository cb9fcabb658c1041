"""GPU figures in one short script: extraction against the bare forward, and exact search at DISC21 size.

1. ``extract``: ``isc.evaluation.extract.extract`` end to end (decode in DataLoader workers, resize,
   batch, forward) for ResNet-50 + GeM at 224 px on ``--images`` JPEGs of 640x480 (skimage's photos,
   written to a temp folder), in images/s, against ``model(x)`` alone on the same batches already
   decoded, resized and on the GPU (the ceiling the engine can reach).
2. ``search``: exact ``knn`` (faiss ``IndexFlatIP`` on every visible GPU, ``evaluation.gpu_index``
   replicate and shard, float32 and float16) of ``--queries`` x ``--database`` x 256 synthetic unit
   vectors (DISC21: 50k x 1M), in seconds, with recall@10 of the float16 index against float32.

Needs a CUDA GPU and faiss-gpu (``make venv FAISS=gpu``); it stops with the reason otherwise.

    .venv/bin/python bench/bench_gpu.py
    .venv/bin/python bench/bench_gpu.py --images 256 --queries 5000 --database 100000   # a minute
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import write_images  # noqa: E402

from isc.data.images import load_image  # noqa: E402
from isc.evaluation import extract as engine  # noqa: E402
from isc.evaluation.search import faiss_gpu_available, knn, recall_at_k  # noqa: E402
from isc.models.descriptor import DescriptorModel  # noqa: E402
from isc.models.pooling import GeM  # noqa: E402
from isc.models.trunks import resnet50  # noqa: E402


def _timed(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    """Best of ``rounds`` wall seconds of ``fn()``, CUDA synchronised."""
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def extraction(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    model = DescriptorModel(trunk=resnet50(), pooling=GeM(p=3.0)).eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images)
        transform = engine.eval_transform(224)
        batches = [
            torch.stack([transform(load_image(p)) for p in paths[i : i + args.batch]]).to(device)
            for i in range(0, len(paths), args.batch)
        ]

        @torch.no_grad()
        def forward() -> None:
            for x in batches:
                model(x)

        def run_extract() -> None:
            engine.extract(
                model,
                paths,
                scales=[224],
                batch_size=args.batch,
                num_workers=args.workers,
                device=device,
                progress=False,
            )

        forward()  # cuDNN's autotuning, the first allocation
        run_extract()  # the workers' first start, the page cache
        bare, full = _timed(forward, args.rounds), _timed(run_extract, args.rounds)
    n = args.images
    print(
        f"ResNet-50 + GeM at 224 px, {n} images of 640x480, batch {args.batch}, {args.workers} workers, "
        f"{torch.cuda.get_device_name()}; best of {args.rounds}"
    )
    print(f"  model(x) on ready batches   {n / bare:8.1f} images/s")
    print(f"  extract (decode + resize)   {n / full:8.1f} images/s   {bare / full:.2f}x the bare forward")


def search(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, 256), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    db, q = unit(args.database), unit(args.queries)
    print(
        f"exact search, {args.queries:,} queries x {args.database:,} database x 256 d, k 10, "
        f"{torch.cuda.device_count()} GPU(s)"
    )
    exact = None
    for placement in ("replicate", "shard"):
        for float16 in (False, True):
            options = {"device": "cuda", "gpu_shard": placement == "shard", "gpu_float16": float16}
            knn(q[:100], db, 10, **options)  # the index's first build, the resources
            started = time.perf_counter()
            _, idx = knn(q, db, 10, **options)
            seconds = time.perf_counter() - started
            if exact is None:
                exact = idx
            recall = recall_at_k(idx, exact)
            kind = "float16" if float16 else "float32"
            print(
                f"  {placement:<9} {kind:<7} {seconds:7.2f} s (index build included)   recall@10 {recall:.4f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--images", type=int, default=2048)
    add("--batch", type=int, default=128)
    add("--workers", type=int, default=8)
    add("--rounds", type=int, default=3)
    add("--queries", type=int, default=50_000)
    add("--database", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU: torch sees none")
    if not faiss_gpu_available():
        raise SystemExit("bench_gpu needs faiss-gpu: make clean && make venv FAISS=gpu")
    extraction(args)
    search(args)


if __name__ == "__main__":
    main()
