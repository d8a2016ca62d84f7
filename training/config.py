"""The training configuration (YAML), validated with pydantic so errors name the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.options import SEMANTIC_CLASSES
from training.data.paste import PasteConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """One dataset folder; ``weight`` is its share of the training patches."""

    kind: Literal["monuseg", "monusac", "instance_folder"]
    root: str
    weight: float = Field(default=1.0, ge=0)
    class_map: dict[int, int] | None = None
    group_pattern: str = r"^(.*)_\d+$"
    name: str | None = None
    open_background: bool = False
    """Train this source's non-nuclear pixels as "background or macrophage" (a partial label): it
    labels nuclei only, so a macrophage's cytoplasm, which MoNuSAC labels macrophage, reads as
    background in it. Training samples only; validation keeps the source's labels."""
    semantic: bool = True
    """Whether this source trains the semantic head. A source whose nuclei have no class (MoNuSeg)
    supervises only background there; off, it trains the ternary head only (measured, not adopted:
    model card, "Nuclei of unfamiliar tissue"). Training samples only."""

    @model_validator(mode="after")
    def _needs_map(self) -> SourceConfig:
        if self.kind == "instance_folder" and not self.class_map:
            raise ValueError(f"source {self.root!r}: kind 'instance_folder' needs a class_map")
        return self

    @property
    def label(self) -> str:
        """Name used in metric keys and the split record."""
        return self.name or {"instance_folder": "consep"}.get(self.kind, self.kind)


class DataConfig(_Strict):
    """Sources and the split by source image."""

    sources: list[SourceConfig]
    val_fraction: float = Field(default=0.15, ge=0, lt=1)
    val_groups: dict[str, list[str]] = Field(default_factory=dict)
    """Per source label, the groups (patients) held out for validation; overrides ``val_fraction``."""
    boundary_width: int = Field(default=2, ge=0)


class AugmentSection(_Strict):
    """Augmentation strengths (see ``training.data.augment``)."""

    flips: bool = True
    hed_sigma: float = Field(default=0.05, ge=0, lt=1)
    hed_bias: float = Field(default=0.02, ge=0)
    hed_strong_p: float = Field(default=0.0, ge=0, le=1)
    hed_strong_sigma: float = Field(default=0.2, ge=0, lt=1)
    brightness: float = Field(default=0.1, ge=0)
    contrast: float = Field(default=0.1, ge=0, lt=1)
    saturation: float = Field(default=0.0, ge=0, lt=1)
    blur_p: float = Field(default=0.0, ge=0, le=1)
    noise: float = Field(default=0.0, ge=0, lt=0.5)


class PasteSection(_Strict):
    """Copy-paste of rare cells (``training.data.paste``)."""

    p: float = Field(default=PasteConfig.p, ge=0, le=1)
    """Share of patches that get pasted cells; 0 turns it off."""
    max_cells: int = Field(default=PasteConfig.max_cells, ge=1)
    classes: tuple[Annotated[int, Field(ge=1, le=len(SEMANTIC_CLASSES) - 1)], ...] = PasteConfig.classes
    """Semantic classes whose cells are pasted (default neutrophil, macrophage)."""
    scale_jitter: float = Field(default=PasteConfig.scale_jitter, ge=0, lt=0.5)
    """Each pasted cell scaled by a factor in ``1 ± scale_jitter``."""
    match_stain: bool = PasteConfig.match_stain
    """Move each pasted cell's colours by the difference of its image's mean tissue colour and the patch's."""


class PatchSection(_Strict):
    """Patch sampling."""

    size: int = Field(default=256, ge=32, multiple_of=32)
    per_epoch: int = Field(default=1000, ge=1)
    foreground_bias: float = Field(default=0.5, ge=0, le=1)
    scale_jitter: float = Field(default=0.1, ge=0, lt=0.5)
    class_bias: float = Field(default=0.0, ge=0, le=1)
    class_draw: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)
    """Draw probabilities of epithelial, lymphocyte, neutrophil, macrophage for class-centred patches."""
    rotate: bool = False
    """Turn each patch by a random angle (one affine warp with the scale jitter; see ``training.data.patches``)."""
    paste: PasteSection = Field(default_factory=PasteSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)


class LossSection(_Strict):
    """Loss weights (see ``training.losses``)."""

    sem_weight: float = Field(default=0.3, ge=0)
    sem_class_weights: tuple[float, ...] | None = None
    ter_class_weights: tuple[float, ...] | None = None
    gamma: float = Field(default=2.0, ge=0)


class TrainSection(_Strict):
    """Optimisation and runtime."""

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: float = Field(default=0.5, ge=0)
    min_lr_ratio: float = Field(default=0.02, ge=0, le=1)
    precision: Literal["auto", "fp32", "bf16", "amp"] = "fp32"  # auto: bf16 where native (CUDA, AVX512-BF16, AMX)
    channels_last: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(default=0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    val_every: int = Field(default=1, ge=1)
    """Validate every N epochs (and after the last); epochs in between log training figures only."""
    best_metric: str = "val_score"
    score_metrics: list[str] = ["val_monuseg_nucleus_dice"]
    grad_clip: float | None = Field(default=5.0, gt=0)
    time_budget_min: float | None = Field(default=None, gt=0)
    init_from: str | None = None
    """Checkpoint whose weights start a fresh run (a warm start; ignored when resuming)."""
    ema: float | None = Field(default=None, gt=0, lt=1)
    """Decay of an exponential average of the weights, kept beside the run and written as ``ema.pt``
    (``training.average``); None: none."""


class CardSection(_Strict):
    """Fields copied into the model card."""

    name: str = "nucseg-model"
    version: str = "0.1"
    mpp: float = Field(default=0.25, gt=0)
    tile_size: int = Field(default=256, ge=32)
    licence: str = "unspecified"
    notes: str = ""


class TrainConfig(_Strict):
    """The whole YAML file."""

    name: str
    out_dir: str
    seed: int = 0
    encoder: str = "resnet18"
    data: DataConfig
    patches: PatchSection = Field(default_factory=PatchSection)
    loss: LossSection = Field(default_factory=LossSection)
    train: TrainSection = Field(default_factory=TrainSection)
    card: CardSection = Field(default_factory=CardSection)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config; relative data roots resolve against the working directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"config {str(path)!r} must be a YAML mapping, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"config {str(path)!r} is invalid:\n{exc}") from exc
