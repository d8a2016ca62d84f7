"""Instance maps to ternary maps, and polygons to instance maps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as draw_polygon

BACKGROUND, INSIDE, BOUNDARY = 0, 1, 2


def polygon_mask(xy: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the pixels whose centres lie inside polygon ``xy`` ((N, 2) as x, y).

    Pixel ``(r, c)`` has its centre at ``(x=c, y=r)``; vertices outside the image are fine (clipped).
    """
    rows, cols = draw_polygon(xy[:, 1], xy[:, 0], shape=shape)
    return rows, cols


def ternary_from_instances(instances: np.ndarray, boundary_width: int = 2) -> np.ndarray:
    """Ternary map (0 background, 1 inside, 2 boundary) from an instance map (0 = background).

    A nucleus pixel is ``boundary`` when a pixel of another label (background or another nucleus)
    lies within ``boundary_width`` pixels (Chebyshev distance), so touching nuclei always get a
    boundary on both sides. Image edges are not boundaries (nuclei cut by the crop continue there).
    """
    if boundary_width < 0:
        raise ValueError(f"boundary_width must be >= 0, got {boundary_width}")
    ternary = np.where(instances > 0, INSIDE, BACKGROUND).astype(np.int64)
    if boundary_width == 0 or not instances.any():
        return ternary
    size = 2 * boundary_width + 1
    hi = ndimage.maximum_filter(instances, size=size, mode="nearest")
    lo = ndimage.minimum_filter(instances, size=size, mode="nearest")
    edge = (instances > 0) & ((hi != instances) | (lo != instances))
    ternary[edge] = BOUNDARY
    return ternary
