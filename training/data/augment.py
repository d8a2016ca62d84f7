"""Patch augmentations on uint8 images and int64 label maps (numpy, one ``Generator`` each)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_LOG_ADJUST = np.log(1e-6)


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths; 0 turns an augmentation off."""

    flips: bool = True
    hed_sigma: float = 0.05
    hed_bias: float = 0.02
    hed_strong_p: float = 0.0
    """Share of patches whose stain jitter is ``hed_strong_sigma`` / ``3 * hed_bias`` instead."""
    hed_strong_sigma: float = 0.2
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.0
    blur_p: float = 0.0
    noise: float = 0.0


def flip_rotate(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip and rot90 (one of the 8 dihedral transforms) for every array."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for arr in arrays:
        arr = np.rot90(arr, k, axes=(0, 1))
        out.append(np.ascontiguousarray(arr[:, ::-1] if flip else arr))
    return out


def hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float, bias: float) -> np.ndarray:
    """Scale and shift the stain concentrations (Tellez et al. 2018) and convert back to RGB."""
    rgb = np.maximum(image.astype(np.float32) / 255.0, 1e-6)
    hed = (np.log(rgb) / _LOG_ADJUST) @ _HED_FROM_RGB.astype(np.float32)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3).astype(np.float32)
    beta = rng.uniform(-bias, bias, size=3).astype(np.float32)
    hed = np.maximum(hed * alpha + beta, 0)
    out = np.exp((hed @ _RGB_FROM_HED.astype(np.float32)) * _LOG_ADJUST)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def brightness_contrast(image: np.ndarray, rng: np.random.Generator, brightness: float,
                        contrast: float) -> np.ndarray:
    """``(x - mean) * c + mean + b`` with ``c`` and ``b`` drawn around 1 and 0."""
    img = image.astype(np.float32)
    c = rng.uniform(1 - contrast, 1 + contrast)
    b = rng.uniform(-brightness, brightness) * 255.0
    mean = img.mean()
    return np.clip((img - mean) * c + mean + b + 0.5, 0, 255).astype(np.uint8)


def saturate(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Blend with the grey image: factor ``1 ± strength`` (below 1 fades colour, above 1 boosts it)."""
    img = image.astype(np.float32)
    grey = img.mean(axis=2, keepdims=True)
    s = rng.uniform(1 - strength, 1 + strength)
    return np.clip(grey + (img - grey) * s + 0.5, 0, 255).astype(np.uint8)


def blur_noise(image: np.ndarray, rng: np.random.Generator, blur_p: float, noise: float) -> np.ndarray:
    """Gaussian blur (σ 0.5–1.5 px) with probability ``blur_p``; additive noise of σ up to ``noise``·255."""
    img = image.astype(np.float32)
    if blur_p > 0 and rng.random() < blur_p:
        img = ndimage.gaussian_filter(img, sigma=(rng.uniform(0.5, 1.5),) * 2 + (0,))
    if noise > 0:
        img = img + rng.normal(0, rng.uniform(0, noise) * 255.0, size=img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def augment(image: np.ndarray, semantic: np.ndarray, ternary: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geometric transforms on all three arrays, colour transforms on the image only."""
    if cfg.flips:
        image, semantic, ternary = flip_rotate([image, semantic, ternary], rng)
    if cfg.hed_strong_p > 0 and rng.random() < cfg.hed_strong_p:
        image = hed_jitter(image, rng, cfg.hed_strong_sigma, 3 * cfg.hed_bias)
    elif cfg.hed_sigma > 0 or cfg.hed_bias > 0:
        image = hed_jitter(image, rng, cfg.hed_sigma, cfg.hed_bias)
    if cfg.brightness > 0 or cfg.contrast > 0:
        image = brightness_contrast(image, rng, cfg.brightness, cfg.contrast)
    if cfg.saturation > 0:
        image = saturate(image, rng, cfg.saturation)
    if cfg.blur_p > 0 or cfg.noise > 0:
        image = blur_noise(image, rng, cfg.blur_p, cfg.noise)
    return image, semantic, ternary
