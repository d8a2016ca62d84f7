"""The contract every package shares, importable without torch (standard library only).

- the classes the network predicts and their colours (the original project's palette);
- ``EngineOptions``: how a slide is cut and run, with its defaults and validation (``nucseg
  predict``, the API's job options and the worker all read them from here);
- the output groups, the result files each group writes, and the content types results are
  served with;
- ``Stats``: the shape of ``stats.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import PurePath
from typing import Any, Literal, NotRequired, TypedDict, cast, get_args

from model.errors import OptionsError

Colour = tuple[int, int, int]

SEMANTIC_CLASSES = ("background", "epithelial", "lymphocyte", "neutrophil", "macrophage")
TERNARY_CLASSES = ("background", "inside", "boundary")
# RGB colours of the original project, used in palettes, overlays and legends.
SEMANTIC_COLOURS: tuple[Colour, ...] = ((0, 0, 0), (255, 0, 0), (0, 128, 255), (255, 255, 0), (0, 255, 0))
TERNARY_COLOURS: tuple[Colour, ...] = ((0, 0, 0), (0, 200, 100), (255, 100, 0))
DEFAULT_ENCODER = "resnet18"  # the shipped model's encoder
TILE_MULTIPLE = 32  # tile sides must be multiples of the encoder's total downsampling
# Tiles per forward pass when the options leave it open, by device. On a 2-core AVX-512 CPU the
# shipped network runs 12-18 % faster a tile in batches of 2-4 than of 8 (benchmarks/RESULTS.md,
# "Batch size on the CPU"); 8 is what the GPU runs were measured with.
DEVICE_BATCH = {"cpu": 4, "cuda": 8}


def device_batch(batch_size: int | None, device: str) -> int:
    """``batch_size``, or the default of ``device`` (``cpu``, ``cuda``, ``cuda:1``) when it is None."""
    return batch_size or DEVICE_BATCH[device.split(":")[0]]


BATCH_HELP = "tiles per forward pass (default: " + ", ".join(f"{n} on {d}" for d, n in DEVICE_BATCH.items()) + ")"
# Tile-logit cache budgets (MB) when the options leave it open, by device: enough for every tile
# that a later block shares on slides up to about 100,000 px wide with bf16 logits (half that width
# in fp32); smaller budgets run some shared tiles twice: 18 % of all tiles at 100,000 px with
# 512 MB of fp32 logits (benchmarks/RESULTS.md, "Tile cache").
DEVICE_CACHE_MB = {"cpu": 2048, "cuda": 4096}


def device_cache_mb(tile_cache_mb: int | None, device: str) -> int:
    """``tile_cache_mb``, or the default of ``device`` when it is None (0 turns the cache off)."""
    return DEVICE_CACHE_MB[device.split(":")[0]] if tile_cache_mb is None else tile_cache_mb


StainMethod = Literal["none", "reinhard", "macenko"]
STAIN_METHODS: tuple[str, ...] = get_args(StainMethod)


@dataclass(frozen=True)
class EngineOptions:
    """How to cut and run the slide. Defaults follow the original project (256/64)."""

    tile_size: int = 256
    overlap: int = 64
    block_size: int = 2048
    batch_size: int | None = None  # None: the device's ``DEVICE_BATCH``
    precision: str = "auto"
    device: str = "auto"
    tissue: bool | None = None  # None: on for multi-level slides, off for single images
    mpp: float | None = None  # overrides the slide's stated resolution
    margin: int = 0  # extra blended pixels around each block, for post-processing
    sigma_scale: float = 0.25
    tile_cache_mb: int | None = None  # logits of tiles later blocks share, kept to run them once; None: the device's
    workers: int | None = None  # nuclei post-processing processes; None: the cores given, 0: in-process
    tta: bool = False  # average each tile's logits over its four flips (about 4x the network's time)
    stain: StainMethod = "none"  # normalise colours to the training images' first (``model.stain``)

    def for_device(self, device: str) -> EngineOptions:
        """These options with the defaults ``device`` gives filled in (batch size, tile cache): what runs."""
        return replace(self, batch_size=device_batch(self.batch_size, device),
                       tile_cache_mb=device_cache_mb(self.tile_cache_mb, device))

    def validate(self, multiple: int = TILE_MULTIPLE) -> None:
        """Raise ``OptionsError`` naming the bad value."""
        if self.tile_size < multiple or self.tile_size % multiple:
            raise OptionsError(f"tile_size must be a positive multiple of {multiple}, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise OptionsError(f"overlap must be in [0, tile_size={self.tile_size}), got {self.overlap}")
        for name in ("block_size", "batch_size"):
            if (getattr(self, name) or 1) < 1:
                raise OptionsError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("margin", "tile_cache_mb", "workers"):
            if (getattr(self, name) or 0) < 0:
                raise OptionsError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stain not in STAIN_METHODS:
            raise OptionsError(f"stain must be one of {', '.join(STAIN_METHODS)}; got {self.stain!r}")


DEFAULTS = EngineOptions()


def engine_options(values: Mapping[str, Any], **overrides: Any) -> EngineOptions:
    """``EngineOptions`` from a job's stored options (other keys, such as ``outputs``, are ignored)."""
    names = {f.name for f in fields(EngineOptions)}
    return EngineOptions(**{k: v for k, v in values.items() if k in names}, **overrides)


# Result groups, in the order they are written and listed, and the files each one writes.
OutputGroup = Literal["masks", "overlays", "nuclei"]
OUTPUT_GROUPS: tuple[OutputGroup, ...] = get_args(OutputGroup)
THUMBNAIL_FILE = "thumbnail.png"


def overlay_file(head: str) -> str:
    """The overlay PNG's name of a head (``semantic``, ``ternary``)."""
    return f"overlay_{head}.png"


GROUP_FILES: dict[str, tuple[str, ...]] = {
    "masks": ("semantic.png", "ternary.png", "semantic.tiff", "ternary.tiff"),
    "overlays": (overlay_file("semantic"), overlay_file("ternary"), THUMBNAIL_FILE),
    "nuclei": ("nuclei.geojson",),
}
STATS_FILE = "stats.json"
JOB_FILE = "job.json"  # the service's durable record of a job, beside its results
CONTENT_TYPES = {".png": "image/png", ".tiff": "image/tiff", ".json": "application/json",
                 ".geojson": "application/geo+json"}
FALLBACK_CONTENT_TYPE = "application/octet-stream"


def result_files(outputs: frozenset[str] | set[str] = frozenset(OUTPUT_GROUPS)) -> list[str]:
    """File names a run with these output groups produces (``stats.json`` always)."""
    unknown = set(outputs) - set(OUTPUT_GROUPS)
    if unknown:
        raise ValueError(f"unknown output groups {sorted(unknown)}; allowed: {list(OUTPUT_GROUPS)}")
    return [STATS_FILE] + [name for group in OUTPUT_GROUPS if group in outputs for name in GROUP_FILES[group]]


def content_type(name: str) -> str:
    """The content type a result file is served with."""
    return CONTENT_TYPES.get(PurePath(name).suffix, FALLBACK_CONTENT_TYPE)


# ---------------------------------------------------------------- the shape of stats.json


class SlideStats(TypedDict):
    name: str
    format: str
    dimensions: list[int]  # level 0 width, height
    levels: int
    mpp: float | None


class AnalysisStats(TypedDict):
    mpp: float
    width: int
    height: int
    level: int
    mpp_source: str  # slide | override | assumed_model_mpp


class ClassStats(TypedDict):
    pixels: int
    area_um2: float
    tissue_fraction: float | None


class HeadStats(TypedDict):
    classes: dict[str, ClassStats]
    total_pixels: int
    colours: list[list[int]]


class TileStats(TypedDict):
    run: int
    reused: int
    skipped: int
    grid: int


class BlockStats(TypedDict):
    total: int
    skipped: int


class ShardStats(TypedDict):
    count: int  # shards merged into this result
    tiles_recomputed: int  # tiles run by two shards (in ``tiles.run`` twice)


class ModelStats(TypedDict):
    name: str
    version: str
    encoder: str
    sha256: str
    format: str
    mpp: float
    held_out: dict[str, Any] | None  # the card's recipe_validation: the recipe on patients it never saw


class Stats(TypedDict):
    """``stats.json``: what one run measured. ``semantic``/``ternary`` come with the masks or
    overlays, ``nuclei`` with the nuclei group, ``shards`` with a result merged from shards
    (``model.shards``: its tile counters and timings are the shards' sums)."""

    slide: SlideStats
    analysis: AnalysisStats
    tissue: dict[str, Any]
    semantic: NotRequired[HeadStats]
    ternary: NotRequired[HeadStats]
    nuclei: NotRequired[dict[str, Any]]
    tiles: TileStats
    blocks: BlockStats
    shards: NotRequired[ShardStats]
    model: ModelStats
    parameters: dict[str, Any]
    device: str
    precision: str
    timings_s: dict[str, float]
    started_at: str
    warnings: list[str]
    versions: dict[str, str]


MaskHead = Literal["semantic", "ternary"]
MASK_HEADS: tuple[MaskHead, ...] = get_args(MaskHead)


def parse_stats(raw: str | bytes) -> Stats:
    """``stats.json`` parsed; ``ValueError`` when it is not a JSON object."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"{STATS_FILE} holds {type(value).__name__}, not an object")
    return cast(Stats, value)


def head_stats(stats: Stats, head: str) -> HeadStats | None:
    """The stats of one head, or ``None`` for another name or a run that wrote neither its masks nor
    its overlays."""
    return cast("HeadStats | None", stats.get(head)) if head in MASK_HEADS else None
