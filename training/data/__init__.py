"""Training data: annotation readers, rasterisation, dataset adapters, patch sampling, splits.

Every adapter yields :class:`~training.data.sample.Sample` objects with one contract:
``image`` uint8 ``(H, W, 3)``, ``semantic`` int64 ``(H, W)`` and ``ternary`` int64 ``(H, W)``,
both with ``IGNORE = -1`` where the label is unknown.
"""

from training.data.sample import IGNORE, Sample

__all__ = ["IGNORE", "Sample"]
