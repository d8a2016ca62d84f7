"""How the semantic head types labelled nuclei whose class the data does not give (MoNuSeg).

Such data cannot score the types, but it can show a failure that class-labelled data of the
training sets' look hides: a head that calls most nuclei of unfamiliar tissue "other". Each labelled nucleus takes the
class of highest mean semantic probability over its pixels (the rule by which the service's GeoJSON
types the nuclei it finds); ``other_share`` is the share whose class is background.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import softmax
from skimage.measure import label as label_components

from model.options import SEMANTIC_CLASSES
from model.postprocess import classify
from training.data.sample import IGNORE, Sample


def unknown_class_nuclei(s: Sample) -> np.ndarray:
    """Ids of ``s``'s labelled nuclei of unknown class (0 elsewhere); merged clumps, whose
    ternary labels are all IGNORE, left out."""
    unknown = s.semantic == IGNORE
    ids = np.where(unknown, s.instances, 0) if s.instances is not None else label_components(unknown, connectivity=1)
    ids = np.asarray(ids, dtype=np.int64)
    shaped = np.zeros(int(ids.max()) + 1, dtype=bool)
    shaped[ids[s.ternary != IGNORE]] = True
    shaped[0] = False
    return np.where(shaped[ids], ids, 0)


def mean_classes(regions: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per region present in ``regions`` (ascending id), its semantic class by the service's rule
    (``model.postprocess.classify``) on its mean ``probs`` ``(C, H, W)``: "other" is background (0)."""
    flat = regions.ravel()
    n = int(flat.max()) + 1
    sums = np.stack([np.bincount(flat, weights=p.ravel(), minlength=n) for p in probs])
    pixels = np.bincount(flat, minlength=n)
    present = np.flatnonzero(pixels)
    present = present[present > 0]
    cls, _ = classify((sums[:, present] / pixels[present]).T)
    return np.where(cls == len(probs) - 1, 0, cls + 1)


class NucleusTypes:
    """Nuclei per semantic class, pooled over images."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(SEMANTIC_CLASSES), dtype=np.int64)

    def update(self, s: Sample, semantic_logits: np.ndarray) -> None:
        """Add one image's nuclei of unknown class, typed from its ``(C, H, W)`` semantic logits."""
        regions = unknown_class_nuclei(s)
        if not regions.any():
            return
        probs = softmax(semantic_logits, axis=0)
        self.counts += np.bincount(mean_classes(regions, probs), minlength=len(SEMANTIC_CLASSES))

    @property
    def nuclei(self) -> int:
        """Nuclei typed so far."""
        return int(self.counts.sum())

    def result(self) -> dict[str, Any]:
        """Counts per class and the share typed background ("other")."""
        return {"nuclei": self.nuclei, "counts": dict(zip(SEMANTIC_CLASSES, self.counts.tolist(), strict=True)),
                "other_share": float(self.counts[0] / self.nuclei) if self.nuclei else float("nan")}
