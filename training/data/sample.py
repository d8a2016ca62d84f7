"""The one record every dataset adapter produces."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

IGNORE = -1
"""Label value meaning "unknown here": excluded from losses and metrics."""

INFLAMMATORY = -2
"""Semantic label meaning "one of lymphocyte, neutrophil, macrophage" (CoNSeP's inflammatory class):
trained as a partial label (loss ``-log sum_c p_c`` over the set), excluded from metrics."""

BACKGROUND_OR_MACROPHAGE = -3
"""Semantic label meaning "background or macrophage": a non-nuclear pixel of a source that labels
nuclei only, where MoNuSAC outlines a macrophage as the whole cell (``SourceConfig.open_background``)."""

PARTIAL_LABELS: dict[int, tuple[int, ...]] = {INFLAMMATORY: (2, 3, 4), BACKGROUND_OR_MACROPHAGE: (0, 4)}


@dataclass(frozen=True)
class Sample:
    """One whole source image with its label maps.

    ``group`` is the unit of splitting (the source image or patient), so that no patch of a
    validation image is ever seen in training.
    """

    name: str
    group: str
    dataset: str
    image: np.ndarray
    semantic: np.ndarray
    ternary: np.ndarray
    instances: np.ndarray | None = None
    """Instance ids (0 = background) where known; used for instance metrics in evaluation."""

    def __post_init__(self) -> None:
        h, w = self.image.shape[:2]
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            got = f"{self.image.dtype} {self.image.shape}"
            raise ValueError(f"sample {self.name!r}: image must be uint8 (H, W, 3), got {got}")
        for label, arr in (("semantic", self.semantic), ("ternary", self.ternary)):
            if arr.shape != (h, w) or arr.dtype != np.int64:
                raise ValueError(
                    f"sample {self.name!r}: {label} must be int64 {(h, w)}, got {arr.dtype} {arr.shape}"
                )


def open_background(s: Sample) -> Sample:
    """``s`` with its labelled non-nuclear pixels (semantic and ternary background) made
    :data:`BACKGROUND_OR_MACROPHAGE`; nuclei, including those labelled background, keep their labels."""
    where = (s.semantic == 0) & (s.ternary == 0)
    return replace(s, semantic=np.where(where, BACKGROUND_OR_MACROPHAGE, s.semantic))


def without_semantic(s: Sample) -> Sample:
    """``s`` with no semantic label (all :data:`IGNORE`): it trains the ternary head only."""
    return replace(s, semantic=np.full_like(s.semantic, IGNORE))
