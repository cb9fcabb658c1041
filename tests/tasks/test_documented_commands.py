"""Every command that README.md and docs/ show runs: found in the text, shrunk to tiny data, executed.

Commands are collected from the Markdown (fenced blocks and inline code), so a command added to the docs is
tested without touching this file. Placeholders (``<run>/checkpoints/<x>.ckpt``, ``/data/disc21``, ...) are
replaced by fixtures, and overrides that shrink the run are appended (tiny images, two steps, one trial);
the documented overrides themselves are kept, so a key or group the docs name that does not compose fails.
Paths the docs cite (``isc/...``, ``conf/...``) must exist.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import compose_cfg
from PIL import Image

import run
from isc.formats.paste_boxes import write_paste_boxes

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_spans(text: str) -> list[str]:
    """Fenced code blocks (continuation lines joined) and inline code spans."""
    spans = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        spans += block.replace("\\\n", " ").splitlines()
    inline = re.findall(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    spans += [" ".join(span.split()) for span in inline]  # inline code may wrap across lines
    return spans


def documented_commands() -> list[str]:
    found: dict[str, None] = {}
    for doc in DOCS:
        for span in _code_spans(doc.read_text()):
            m = re.search(r"(?:\.venv/bin/)?python (run\.py|-m isc\.[\w.]+|bench/\w+\.py)(.*)", span)
            if m:
                command = re.sub(r"\s+#.*$", "", f"python {m.group(1)}{m.group(2)}").strip()
                if "..." not in command:  # prose such as "call `python run.py ...`"
                    found[" ".join(command.split())] = None
    return list(found)


def test_the_docs_show_commands_and_cite_existing_files() -> None:
    assert len(COMMANDS) >= 15  # the parser still finds them
    assert len(documented_commands()) > len(COMMANDS)  # and the docs' variants of one run are run once
    missing = []
    upstream = ("github", "facebookresearch", "WangWenhao0716", "zengarden", "seed's", "official")
    for doc in DOCS:
        text = "\n".join(
            line for line in doc.read_text().splitlines() if not any(u in line for u in upstream)
        )
        for path in re.findall(
            r"\b((?:isc|conf|tests|bench|callbacks|datamodules|lightning_modules|docs)/[\w./{},-]*\w)",
            text,
        ):
            if "{" in path or "*" in path or "<" in path:
                continue
            if not (ROOT / path).exists() and not (ROOT / (path + ".py")).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing


# --------------------------------------------------------------------------------------------------
# fixtures the placeholders stand for


@pytest.fixture(scope="module")
def world(benchmark: Path, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Files and folders for every placeholder the docs use."""
    tmp = tmp_path_factory.mktemp("docs")
    patch = pytest.MonkeyPatch()
    patch.setenv("ISC_CACHE_DIR", str(tmp / "cache"))  # the embedded benchmark, built once for the module
    photos = tmp / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photos / f"P{i:03d}.jpg")
    (photos / "BACKGROUND_Google").mkdir()  # Caltech-101's clutter folder, pasted into benchmark queries
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            photos / "BACKGROUND_Google" / f"B{i:03d}.jpg"
        )
    train_dir = tmp / "train"
    cfg = compose_cfg([*tiny_finetune(), f"dataset.root={benchmark}"], train_dir)
    run.run_task(cfg)
    ckpt = str(next((train_dir / "checkpoints").glob("epoch*.ckpt")))
    export_dir = tmp / "export"
    run.run_task(compose_cfg(["task=export", f"ckpt_path={ckpt}"], export_dir))
    eval_dir = tmp / "eval"
    run.run_task(compose_cfg([*tiny_eval(), "task=evaluate", f"dataset.root={benchmark}"], eval_dir))
    copies = tmp / "copies"
    for c in range(4):
        (copies / f"T{c:06d}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (60 * c, 80 * i, 20)).save(copies / f"T{c:06d}" / f"{i:02d}.jpg")
    # experiment=d2lv_inference_families' folder: every one of its 33 names is the exported model
    d2lv_models = tmp / "d2lv_models"
    d2lv_models.mkdir()
    families = compose_cfg(["experiment=d2lv_inference_families", f"d2lv_models={d2lv_models}"])
    for family in families.evaluation.ensemble.families:
        for model in family.models:
            Path(model).symlink_to(export_dir / "descriptor_model.pt")
    # paste boxes, so task=train_detector has something to learn from (where is not checked here)
    write_paste_boxes(copies / "boxes.csv", {f"T{c:06d}/01": (4.0, 6.0, 30.0, 28.0) for c in range(4)})
    yield {
        "benchmark": str(benchmark),
        "photos": str(photos),
        "ckpt": ckpt,
        "export": str(export_dir / "descriptor_model.pt"),
        "descriptors": str(eval_dir / "descriptors.h5"),
        "predictions": str(eval_dir / "predictions.csv"),
        "ground_truth": str(benchmark / "ground_truth.csv"),
        "copies": str(copies),
        "cache": str(tmp / "cache"),
        "d2lv_models": str(d2lv_models),
    }
    patch.undo()


def substitute(command: str, w: dict[str, str]) -> str:
    """Replace the docs' placeholders by fixtures (longest patterns first)."""
    rules = [
        (r"outputs/export/<time>/descriptor_model\.pt", w["export"]),
        (r"outputs/pretrain/<run>/checkpoints/last\.ckpt|<pretrain(?:ing)? last\.ckpt>", "null"),
        (r"(?:outputs/finetune/<time>|<run>)/checkpoints/(?:<[\w ]+>|[\w.-]+)\.ckpt", w["ckpt"]),
        (r"<cache>/embedded-v2", w["benchmark"]),
        (r"<copies>|<folder from task=generate>|/data/copies/d2lv_base", w["copies"]),
        (r"<benchmark>|<validation benchmark>|<bench>|/data/disc21_val|/data/bench", w["benchmark"]),
        (
            r"/data/disc21/training|/data/imagenet/train|/data/images|/any/folder/of/images|/data/photos",
            w["photos"],
        ),
        (r"\.\./shared/data/caltech101|/work/shared/data/caltech101", w["photos"]),
        (r"/data/disc21", w["benchmark"]),
        (r"/models/d2lv", w["d2lv_models"]),
        (r"\bdesc\.h5\b|<run>/descriptors\.h5", w["descriptors"]),
        (r"\bground_truth\.csv\b", w["ground_truth"]),
        (r"\bpredictions\.csv\b", w["predictions"]),
        (r"\{queries:q\.hdf5,references:r\.hdf5,training:t\.hdf5\}", w["descriptors"]),
    ]
    for pattern, value in rules:
        command = re.sub(pattern, value, command)
    assert "<" not in command and "/data/" not in command, f"unknown placeholder in: {command}"
    return command


def tiny_eval() -> list[str]:
    return ["evaluation.image_size=32", "evaluation.num_workers=0", "evaluation.score_normalization.k=2"]


def tiny_finetune() -> list[str]:
    return [
        *tiny_eval(),
        "debug=default",
        "trainer.accelerator=cpu",
        "evaluation.image_size=32",
        "data.image_size=32",
        "data.num_workers=0",
        "data.p=2",
        "data.k=2",
        "data.steps_per_epoch=2",
    ]


SHRINK = {
    "pretrain_barlow": ["model.projector_dims=[32,32]", "data.batch_size=2", "data.image_size=32"],
    "pretrain_m2t": ["model.projector_hidden_dim=32", "model.predictor_hidden_dim=32", "data.batch_size=2"],
}


def shrink(args: list[str], out: Path) -> list[str]:
    """Keep the documented overrides, drop GPU-only ones, append what makes the run tiny."""
    gpu_only = ("trainer=gpu", "trainer=ddp", "trainer.strategy=", "trainer.devices=", "trainer.num_nodes=")
    args = [a for a in args if not a.startswith((*gpu_only, "hydra.launcher.partition="))]
    args = ["hydra/launcher=local" if a == "hydra/launcher=slurm" else a for a in args]  # no cluster here
    text = " ".join(args)
    extra = [*tiny_eval()]
    if "task=generate" in text:
        extra += [
            "generate.copies=1",
            "generate.every=4",
            "generate.workers=0",
            f"generate.out_dir={out}/copies",
        ]
    elif "task=train_detector" in text:
        extra += [
            "detector.steps=2",
            "detector.batch_size=2",
            "detector.image_size=64",
            "detector.holdout=0.5",
        ]
    elif "task=build_benchmark" in text:
        extra += ["benchmark.n_references=4", "benchmark.n_training=4", "benchmark.n_queries=4"]
    elif "experiment=pretrain" in text:
        extra += ["debug=default", "trainer.accelerator=cpu", "data.num_workers=0", "data.image_size=32"]
        extra.append("trainer.limit_train_batches=1")  # one step of ResNet-152 twins is seconds
        extra += SHRINK["pretrain_barlow" if "barlow" in text else "pretrain_m2t"]
        if "data.max_images" not in text:
            extra.append("data.max_images=8")
    elif ("task=" not in text and "experiment=d2lv_inference" not in text) or "experiment=finetune" in text:
        extra += tiny_finetune()
        if "experiment=finetune_d2lv" in text:
            extra += ["evaluation.whitening.dim=4", "model.head.hidden_dims=[16]", "model.head.out_dim=8"]
    if any(
        w in text
        for w in ("evaluation.whitening.enabled=true", "evaluation.whitening.dim=", "d2lv_inference")
    ):
        extra.append("evaluation.whitening.dim=4")  # the tiny benchmark has 6 training images
    if "evaluation.scales" in text or "d2lv_inference" in text or "local_verification" in text:
        extra += [  # the test stage on 48-px images: two small scales, few views
            "evaluation.scales=[64,72]",
            "evaluation.local_verification.query.min_size=8",
            "evaluation.local_verification.query.proposals.max_proposals=2",
            "evaluation.local_verification.query.proposals.max_side=96",  # full resolution costs seconds
        ]
    if "hparams_search=optuna" in text:
        extra += ["hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2"]
    if "-m" in args:
        return [*args, *extra, f"hydra.sweep.dir={out}/multirun"]
    return [*args, *extra]


def what_runs(command: str) -> tuple[str, ...]:
    """The command as the test runs it, on symbolic fixtures."""
    words = shlex.split(substitute(command, {key: f"@{key}" for key in WORLD}))
    if words[1].startswith("bench/") or words[1] == "-m" or "--help" in words:
        return tuple(words)
    return tuple(shrink(words[2:], Path("@out")))


def distinct(commands: list[str]) -> list[str]:
    """One command of each group that runs the same (they differ only in placeholders, such as two
    spellings of a checkpoint path, or in GPU-only overrides): the first one the docs show."""
    first: dict[tuple[str, ...], str] = {}
    for command in commands:
        first.setdefault(what_runs(command), command)
    return list(first.values())


WORLD = (
    "benchmark",
    "photos",
    "ckpt",
    "export",
    "descriptors",
    "predictions",
    "ground_truth",
    "copies",
    "cache",
    "d2lv_models",
)
COMMANDS = distinct(documented_commands())

BENCH_QUICK = {  # the same scripts on toy sizes: these tests check that they run, not their figures
    "bench_augment.py": ["--seconds", "0.5", "--warmup", "0.2", "--sources", "4"],
    "bench_generate.py": ["--classes", "2", "--copies", "2"],
    "bench_lightning_overhead.py": ["--steps", "2", "--batch", "4", "--size", "32", "--rounds", "1"],
    "bench_metrics.py": [
        "--predictions",
        "2000",
        "--queries",
        "500",
        "--references",
        "5000",
        "--repeat",
        "1",
    ],
    "bench_search.py": ["--queries", "100", "--database", "1000", "--repeats", "1"],
    "bench_proposals.py": ["max_side=64"],
    "bench_index.py": ["--database", "2000", "--queries", "100", "--training", "5000", "--clusters", "20"]
    + ["--index", "IVF16,Flat", "--parameters", "nprobe=4"],
    "bench_inference.py": [
        "--queries",
        "50",
        "--views",
        "4",
        "--references",
        "500",
        "--block",
        "200",
        "--full-queries",
        "1000",
        "--full-references",
        "10000",
    ],
    "bench_pretrain.py": ["--size", "32", "--batch", "2", "--steps", "1"],
    "bench_prepass.py": ["--images", "20", "--size", "64x48"],
    "bench_distributed.py": [
        "--images",
        "16",
        "--shard",
        "4",
        "--batch",
        "4",
        "--size",
        "64",
        "--rounds",
        "1",
    ],
    "bench_aggregate.py": [
        "--queries",
        "100",
        "--full-queries",
        "200",
        "--references",
        "2000",
        "--query-block",
        "30",
    ],
    "bench_gpu.py": [
        "--images",
        "16",
        "--batch",
        "8",
        "--rounds",
        "1",
        "--queries",
        "500",
        "--database",
        "5000",
    ],
    "bench_extract.py": ["--images", "8", "--batch", "4", "--size", "64", "--rounds", "1"],
    "bench_scale.py": ["--quick", "--references", "2000,4000", "--queries", "500"],  # after any sizes shown
}


def run_bench(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The script's ``main()`` with its command line, in this process: the imports (seconds a process)
    are paid once for every bench. What a bench changes in the process is put back: its CPU affinity
    (bench_augment pins one core, which every later test and subprocess would inherit), environment and
    thread counts."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", [script, *args])
    environ, threads, cv2_threads = dict(os.environ), torch.get_num_threads(), cv2.getNumThreads()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        importlib.import_module(Path(script).stem).main()
    finally:
        if cores is not None:
            os.sched_setaffinity(0, cores)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_runs(
    command: str, world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISC_CACHE_DIR", world["cache"])
    words = shlex.split(substitute(command, world))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if words[1] == "bench/bench_gpu.py" and not torch.cuda.is_available():  # the GPU figures' script
        with pytest.raises(SystemExit, match="bench_gpu needs a CUDA GPU"):
            run_bench(words[1], words[2:], monkeypatch)
        return
    if words[1].startswith("bench/"):
        run_bench(words[1], [*words[2:], *BENCH_QUICK[Path(words[1]).name]], monkeypatch)
        return
    if words[1] == "-m" or "--help" in words:  # a module's CLI, Hydra's help
        result = subprocess.run(
            [sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return
    args = shrink(words[2:], tmp_path)
    if "-m" in args:  # a Hydra multirun needs the launcher: run the real CLI
        result = subprocess.run(
            [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        jobs = sorted(p.parent for p in (tmp_path / "multirun").glob("*/metrics.json"))
        assert len(jobs) >= 2, "every job of the sweep writes its own metrics.json in its own folder"
        configs = [(j / "config_resolved.yaml").read_text() for j in jobs]
        assert len(set(configs)) == len(jobs), "the jobs ran the same configuration"
        if "task=" not in " ".join(args):  # fine-tuning sweeps: each job ends with its callback's figure
            assert all("val/uAP" in json.loads((j / "metrics.json").read_text()) for j in jobs)
        return
    run.run_task(compose_cfg(args, tmp_path / "run"))
