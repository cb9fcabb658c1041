"""Config -> objects helpers every task shares: the dataset folder, the settings, the model, names."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from isc.data.benchmark import default_cache_dir, ensure_embedded_benchmark
from isc.evaluation.distributed import Ranks
from isc.evaluation.settings import EvaluationSettings
from isc.formats.files import atomic_write
from isc.models.descriptor import DescriptorModel, load_descriptor_model


def dataset_root(cfg: DictConfig) -> Path:
    """The DISC21-layout folder to use: ``dataset.root``, or the embedded benchmark (built on first use)."""
    if cfg.dataset.root:  # `dataset=disc21` without a root stops here (conf/dataset/disc21.yaml)
        return Path(cfg.dataset.root).expanduser()
    d = cfg.dataset
    return ensure_embedded_benchmark(
        instantiate(cfg.query_augmentation),
        cfg.paths.cache_dir,
        d.name,
        n_references=d.n_references,
        n_training=d.n_training,
        n_queries=d.n_queries,
        matched_fraction=d.matched_fraction,
        seed=d.build_seed,
    )


def write_json(path: Path, obj: object) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def evaluation_settings(cfg: DictConfig) -> EvaluationSettings:
    """The ``evaluation:`` config parsed once; every task and the retrieval callback use this object."""
    return EvaluationSettings.from_dict(OmegaConf.to_container(cfg.evaluation, resolve=True))  # type: ignore[arg-type]


def descriptor_model(cfg: DictConfig) -> DescriptorModel:
    """The model to evaluate or export: ``ckpt_path`` (a training checkpoint or an exported file), else ``backbone``."""
    if cfg.ckpt_path:
        return load_descriptor_model(Path(cfg.ckpt_path).expanduser())
    model: DescriptorModel = instantiate(cfg.backbone)
    return model


def descriptor_cache(cfg: DictConfig, settings: EvaluationSettings) -> Path | None:
    """Where the extraction engine keeps its shards: ``evaluation.cache_dir`` (``auto``: the user cache)."""
    if settings.cache_dir in (None, "", False):
        return None
    if settings.cache_dir == "auto":
        root = Path(cfg.paths.cache_dir).expanduser() if cfg.paths.cache_dir else default_cache_dir()
        return root / "descriptors"
    return Path(str(settings.cache_dir)).expanduser().absolute()


def extraction_group(cfg: DictConfig) -> Ranks:
    """The processes that share the extraction: ``trainer.devices`` x ``trainer.num_nodes`` of them,
    started by Lightning Fabric (which also joins a group that torchrun or SLURM started); one process
    unless the trainer config asks for more. Call it after the data and models are ready: the other
    processes rerun the command, and find them built."""
    t = cfg.trainer
    if str(t.devices) == "1" and int(t.num_nodes) == 1:
        return Ranks()
    if t.strategy not in ("auto", "ddp"):
        raise ValueError(
            f"trainer.strategy={t.strategy}: task={cfg.task} starts its processes as trainer=ddp does "
            "(strategy ddp, one process per device, the command rerun for each)"
        )
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy="ddp")
    if fabric.world_size == 1:
        return Ranks()
    fabric.launch()
    return Ranks(fabric.global_rank, fabric.world_size)


def recipe_name(group: str) -> str:
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.choices.get(group) or "")
    except ValueError:  # composed outside @hydra.main (tests, notebooks)
        return ""


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
