"""The model card: what a checkpoint is, and how the engine must feed it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.options import DEFAULT_ENCODER, SEMANTIC_CLASSES, SEMANTIC_COLOURS, TERNARY_CLASSES, TERNARY_COLOURS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalisation(BaseModel):
    """Input scaling: ``(rgb / 255 - mean) / std`` per channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class ReinhardReference(BaseModel):
    """LAB mean and std of the training images' tissue pixels (means over images)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class MacenkoReference(BaseModel):
    """Stain vectors (columns: haematoxylin, eosin; OD per RGB channel) and 99th-percentile concentrations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    he: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    max_c: tuple[float, float]


class StainReference(BaseModel):
    """What the training images look like, per method (model card field ``stain_reference``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reinhard: ReinhardReference
    macenko: MacenkoReference


class HeldOutClass(BaseModel):
    """One cell type on patients the recipe never trained on: labelled cells, pixel IoU, detection F1
    (centroids within 12 px) with its 95 % bootstrap interval over images, and PQ."""

    model_config = ConfigDict(extra="allow", frozen=True)

    gt_cells: int = Field(ge=0)
    iou: float | None
    det_f1: float | None
    det_f1_ci: tuple[float, float] | None
    pq: float | None


class RecipeValidation(BaseModel):
    """How the recipe that made a model did on patients it never saw (model card field
    ``recipe_validation``): a run of the same recipe with those patients held out."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str = Field(description="the held-out run the figures come from")
    patients: tuple[str, ...]
    images: int = Field(ge=0)
    classes: dict[str, HeldOutClass]


class ModelCard(BaseModel):
    """Facts the engine, the API and the reports need about a checkpoint."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    name: str = "unnamed"
    version: str = "0"
    encoder: str = DEFAULT_ENCODER
    semantic_classes: tuple[str, ...] = SEMANTIC_CLASSES
    ternary_classes: tuple[str, ...] = TERNARY_CLASSES
    semantic_colours: tuple[tuple[int, int, int], ...] = SEMANTIC_COLOURS
    ternary_colours: tuple[tuple[int, int, int], ...] = TERNARY_COLOURS
    mpp: float = Field(0.25, gt=0, description="training resolution in µm/px (MoNuSAC: 0.25, 40x)")
    normalisation: Normalisation = Normalisation()
    tile_size: int = Field(256, ge=32)
    licence: str = "unspecified"
    notes: str = ""
    stain_reference: StainReference | None = Field(None, description="the training images' colours, for the "
                                                   "engine's stain option (written by training.stain)")
    recipe_validation: RecipeValidation | None = Field(None, description="the recipe's figures on held-out "
                                                       "patients, which stats.json repeats beside each result")

    def public(self) -> dict[str, Any]:
        """The card as plain JSON-able data."""
        return self.model_dump(mode="json")
