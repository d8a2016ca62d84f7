"""Low-resolution tissue detection, so that tiles of bare glass are never run."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from model.analysis import AnalysisView
from model.readers import thumbnail
from model.tiling import Box

THUMB_SIDE = 2048
SATURATION_MIN = 0.07  # H&E stains are saturated; glass and dust are not
VALUE_MAX = 0.94  # glass is bright
MIN_OBJECT_FRACTION = 1e-4


@dataclass
class TissueMask:
    """Boolean mask where one mask pixel spans ``px`` analysis pixels on a side."""

    mask: np.ndarray
    px: float
    area: float | None = None  # exact tissue area in analysis pixels, when known

    def any_in(self, box: Box) -> bool:
        """True when any tissue lies under ``box`` (analysis coordinates)."""
        h, w = self.mask.shape
        x0, y0 = max(int(box.x0 / self.px), 0), max(int(box.y0 / self.px), 0)
        x1, y1 = min(int(np.ceil(box.x1 / self.px)), w), min(int(np.ceil(box.y1 / self.px)), h)
        return bool(x1 > x0 and y1 > y0 and self.mask[y0:y1, x0:x1].any())

    def area_px(self) -> float:
        """Tissue area in analysis pixels."""
        if self.area is not None:
            return self.area
        return float(self.mask.sum()) * self.px * self.px


def full_tissue(view: AnalysisView) -> TissueMask:
    """Everything counts as tissue (detection off)."""
    side = float(max(view.width, view.height)) + 1.0
    return TissueMask(np.ones((1, 1), dtype=bool), side, area=float(view.width * view.height))


def tissue_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail: saturated, not bright (glass); closed twice by a
    3x3 square, holes filled, objects under ``MIN_OBJECT_FRACTION`` of the image (4-connected) dropped."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # per plane: numpy reduces a last axis of 3 slowly
    vmax = np.maximum(np.maximum(r, g), b).astype(np.float32) / 255.0
    vmin = np.minimum(np.minimum(r, g), b).astype(np.float32) / 255.0
    saturation = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0)
    mask = ((saturation > SATURATION_MIN) & (vmax < VALUE_MAX)).view(np.uint8)
    return _keep_large(_fill_holes(_close(mask)))


_SQUARE = np.ones((3, 3), np.uint8)


def _close(mask: np.ndarray) -> np.ndarray:
    """Dilated then eroded twice, nothing outside the image."""
    grown = cv2.dilate(mask, _SQUARE, iterations=2, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.erode(grown, _SQUARE, iterations=2, borderType=cv2.BORDER_CONSTANT, borderValue=0)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus the background (4-connected) that does not reach the image's edge."""
    n, labels = cv2.connectedComponents(1 - mask, connectivity=4)
    open_to_edge = np.zeros(n, dtype=bool)
    open_to_edge[0] = True  # label 0: the mask itself
    open_to_edge[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    return mask | (~open_to_edge[labels]).view(np.uint8)


def _keep_large(mask: np.ndarray) -> np.ndarray:
    """The 4-connected objects of ``mask`` of at least ``MIN_OBJECT_FRACTION`` of the image (and 4 px)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= max(4, MIN_OBJECT_FRACTION * mask.size)
    keep[0] = False
    return keep[labels]


def slide_thumbnail(view: AnalysisView) -> tuple[np.ndarray, float]:
    """The thumbnail tissue detection (and stain fitting) reads: RGB uint8 and level-0 px per thumbnail px."""
    return thumbnail(view.reader, THUMB_SIDE)


def detect_tissue(view: AnalysisView, thumb: tuple[np.ndarray, float] | None = None) -> TissueMask:
    """Tissue mask from a thumbnail of the slide (read here unless given), in analysis-pixel units."""
    rgb, l0_per_thumb_px = thumb if thumb is not None else slide_thumbnail(view)
    return TissueMask(tissue_from_rgb(rgb), l0_per_thumb_px / view.l0_per_px)
