"""The analysis level: the slide presented at the model's resolution.

The view picks the coarsest pyramid level that is at least as fine as the model's mpp and resamples
it. Pixels are addressed in analysis coordinates; ``read`` takes a box inside the image, and the
engine handles padding past the edge itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from model.errors import OptionsError
from model.readers import SlideReader
from model.tiling import Box

log = logging.getLogger(__name__)

# Within this relative difference a level's mpp counts as the model's: no resampling.
MPP_TOLERANCE = 0.05


@dataclass
class AnalysisView:
    """A slide level resampled by ``scale`` (level pixels per analysis pixel)."""

    reader: SlideReader
    level: int
    scale: float
    mpp: float
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)

    @property
    def bounds(self) -> Box:
        return Box(0, 0, self.width, self.height)

    @property
    def l0_per_px(self) -> float:
        """Level-0 pixels per analysis pixel (to map results back to slide coordinates)."""
        return self.scale * self.reader.level_downsamples[self.level]

    def read(self, box: Box) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``box`` in analysis coordinates."""
        if self.scale == 1.0:
            return self._read_level(box.x0, box.y0, box.width, box.height)
        s = self.scale
        margin = math.ceil(2 * max(s, 1.0)) + 2
        lx0, ly0 = math.floor(box.x0 * s) - margin, math.floor(box.y0 * s) - margin
        lx1, ly1 = math.ceil(box.x1 * s) + margin, math.ceil(box.y1 * s) + margin
        region = self._read_level(lx0, ly0, lx1 - lx0, ly1 - ly0)
        src = (box.x0 * s - lx0, box.y0 * s - ly0, box.x1 * s - lx0, box.y1 * s - ly0)
        resized = Image.fromarray(region).resize((box.width, box.height), Image.Resampling.BICUBIC, box=src)
        return np.asarray(resized)

    def _read_level(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.reader.level_downsamples[self.level]
        return self.reader.read_region(self.level, round(x * ds), round(y * ds), w, h)


def make_view(reader: SlideReader, model_mpp: float, *, mpp_override: float | None = None) -> AnalysisView:
    """Choose the level and scale that bring ``reader`` to ``model_mpp``."""
    if mpp_override is not None and mpp_override <= 0:
        raise OptionsError(f"mpp override must be positive, got {mpp_override}")
    warnings: list[str] = []
    slide_mpp = mpp_override or reader.mpp
    if slide_mpp is None:
        slide_mpp = model_mpp
        msg = (f"slide {reader.name!r} states no resolution and no --mpp was given; "
               f"assuming the model's {model_mpp} µm/px")
        log.warning(msg)
        warnings.append(msg)
    level = _finest_enough_level(reader, slide_mpp, model_mpp)
    level_mpp = slide_mpp * reader.level_downsamples[level]
    scale = model_mpp / level_mpp
    if abs(scale - 1.0) <= MPP_TOLERANCE:
        scale, mpp = 1.0, level_mpp
    else:
        mpp = model_mpp
    lw, lh = reader.level_dimensions[level]
    width, height = max(1, round(lw / scale)), max(1, round(lh / scale))
    return AnalysisView(reader, level, scale, mpp, width, height, warnings)


def _finest_enough_level(reader: SlideReader, slide_mpp: float, model_mpp: float) -> int:
    """The coarsest level whose mpp is at most the model's (within tolerance); else level 0."""
    best = 0
    for level, ds in enumerate(reader.level_downsamples):
        if slide_mpp * ds <= model_mpp * (1 + MPP_TOLERANCE):
            best = level
    return best
