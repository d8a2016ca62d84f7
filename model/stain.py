"""Stain normalisation at inference: a slide's colours mapped onto the training images' (engine option ``stain``).

Two methods, each fitted once per slide on its thumbnail and applied to every block as it is read:

- ``reinhard``: the LAB mean and std of the slide's tissue pixels matched to the reference's
  (Reinhard et al. 2001; LAB as scikit-image computes it, D65, in float32 with a table for the bytes).
- ``macenko``: the slide's haematoxylin and eosin vectors and 99th-percentile concentrations, found in
  optical density (torchstain's fit), mapped onto the reference's (Macenko et al. 2009).

The reference (``model.card.StainReference``) is the training images', written by
``python -m training.stain``. Measured on held-out patients, both methods hurt the shipped model
(model card, "Stain normalisation"): the option is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.card import MacenkoReference, ReinhardReference, StainReference
from model.errors import OptionsError
from model.options import STAIN_METHODS

WHITE_L = 90.0  # LAB lightness above which a pixel is glass or fat, not tissue
MIN_TISSUE = 100  # fewer tissue pixels than this: the statistics are taken over every pixel
MACENKO_IO, MACENKO_ALPHA, MACENKO_BETA = 240, 1, 0.15  # glass intensity; angle percentile; unstained OD
MIN_STAINED = 100  # fewer stained pixels than this: no stain vectors to find
ROWS = 512  # rows of a block transformed at a time (bounds the float intermediates)

# scikit-image's sRGB (D65) -> XYZ matrix and white point, and the tables built from them
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS, _KAPPA = 0.008856, 7.787
_V = torch.arange(256, dtype=torch.float64) / 255
_LINEAR = torch.where(_V > 0.04045, ((_V + 0.055) / 1.055).pow(2.4), _V / 12.92).float()  # sRGB byte -> linear
_TO_XYZ = (_XYZ_FROM_RGB.T / _WHITE).float()
_FROM_XYZ = (torch.linalg.inv(_XYZ_FROM_RGB).T * _WHITE[:, None]).float()
_OD = (-torch.log((torch.arange(256, dtype=torch.float64) + 1) / MACENKO_IO)).float()  # byte -> optical density


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` uint8 RGB -> float32 LAB, as ``skimage.color.rgb2lab`` (to about 1e-4)."""
    xyz = _LINEAR[rgb.long()] @ _TO_XYZ
    f = torch.where(xyz > _EPS, xyz.clamp_min(0).pow(1 / 3), _KAPPA * xyz + 16 / 116)
    return torch.stack((116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])), -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` LAB -> float32 RGB in [0, 1], as ``skimage.color.lab2rgb`` (to about 1e-5)."""
    lab = lab.float()
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack((lab[..., 1] / 500 + fy, fy, (fy - lab[..., 2] / 200).clamp_min(0)), -1)
    linear = torch.where(f.pow(3) > _EPS, f.pow(3), (f - 16 / 116) / _KAPPA) @ _FROM_XYZ
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0).pow(1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1)


def lab_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the LAB channels over the tissue pixels of an RGB uint8 image."""
    lab = rgb_to_lab(_tensor(image.reshape(-1, 3))).numpy().astype(np.float64)
    tissue = lab[lab[:, 0] < WHITE_L]
    if len(tissue) < MIN_TISSUE:
        tissue = lab
    return tissue.mean(axis=0), np.maximum(tissue.std(axis=0), 1e-3)


def stained_pixels(image: np.ndarray) -> int:
    """How many pixels have optical density above ``MACENKO_BETA`` in every channel."""
    return int((_OD.numpy()[image.reshape(-1, 3)] >= MACENKO_BETA).all(axis=1).sum())


def macenko_fit(image: np.ndarray) -> MacenkoReference:
    """Stain vectors and concentration range of an RGB uint8 image (torchstain's Macenko fit)."""
    import torchstain

    fitted = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    fitted.fit(image.reshape(-1, 1, 3), Io=MACENKO_IO, alpha=MACENKO_ALPHA, beta=MACENKO_BETA)
    he = np.asarray(fitted.HERef, dtype=np.float64)
    return MacenkoReference(he=tuple(tuple(map(float, row)) for row in he),
                            max_c=tuple(map(float, fitted.maxCRef)))


@dataclass(frozen=True)
class StainTransform:
    """One slide's fitted normalisation: ``__call__`` maps an ``(h, w, 3)`` uint8 block to uint8."""

    source: ReinhardReference | MacenkoReference
    target: ReinhardReference | MacenkoReference

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = np.empty_like(pixels)
        for y in range(0, pixels.shape[0], ROWS):
            out[y : y + ROWS] = self._rows(_tensor(pixels[y : y + ROWS])).numpy()
        return out

    def _rows(self, rgb: torch.Tensor) -> torch.Tensor:
        if isinstance(self.source, ReinhardReference) and isinstance(self.target, ReinhardReference):
            return _reinhard(rgb, self.source, self.target)
        assert isinstance(self.source, MacenkoReference) and isinstance(self.target, MacenkoReference)
        return _macenko(rgb, self.source, self.target)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array`` (copied only if numpy marks it read-only or strided)."""
    return torch.from_numpy(np.require(array, requirements=("C", "W")))


def _reinhard(rgb: torch.Tensor, source: ReinhardReference, target: ReinhardReference) -> torch.Tensor:
    scale = torch.tensor(target.std) / torch.tensor(source.std)
    shift = torch.tensor(target.mean) - torch.tensor(source.mean) * scale
    return (lab_to_rgb(rgb_to_lab(rgb) * scale + shift) * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)


def _macenko(rgb: torch.Tensor, source: MacenkoReference, target: MacenkoReference) -> torch.Tensor:
    scale = torch.tensor(target.max_c, dtype=torch.float64) / torch.tensor(source.max_c, dtype=torch.float64)
    unmix = (torch.linalg.pinv(torch.tensor(source.he, dtype=torch.float64)).T * scale).float()  # OD -> scaled C
    od = _OD[rgb.long()]  # (h, w, 3)
    out = MACENKO_IO * torch.exp(-(od @ unmix) @ torch.tensor(target.he).T)
    return out.clamp(0, 255).to(torch.uint8)  # truncated, as torchstain's normalize


def fit_stain(method: str, reference: StainReference | None,
              thumb: np.ndarray) -> tuple[StainTransform | None, str | None]:
    """The slide's transform for ``method`` fitted on its thumbnail, and a warning when it cannot be fitted.

    ``method == "none"`` gives ``(None, None)``; a model without a reference is an options error."""
    if method == "none":
        return None, None
    if reference is None:
        raise OptionsError(f"stain={method!r} needs a model whose card has a stain_reference; this model has none")
    if method == "reinhard":
        mean, std = lab_stats(thumb)
        source = ReinhardReference(mean=tuple(map(float, mean)), std=tuple(map(float, std)))
        return StainTransform(source, reference.reinhard), None
    if method == "macenko":
        if stained_pixels(thumb) < MIN_STAINED:
            return None, "stain normalisation skipped: too few stained pixels to find stain vectors"
        return StainTransform(macenko_fit(thumb), reference.macenko), None
    raise OptionsError(f"stain must be one of {', '.join(STAIN_METHODS)}; got {method!r}")
