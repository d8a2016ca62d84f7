"""Training data packed into one file small enough to travel to a GPU machine.

``python -m training.pack --config training/configs/v8.yaml --out .pack/data.zip`` loads every source
of a config, as training would, and writes all their samples (training and validation alike: the
split is the config's, made again on loading) into one uncompressed zip: each image as a JPEG (quality
``JPEG_QUALITY``, 4:2:0 chroma, as scanners store slides; on the training images a mean error of 1 to 4
grey levels, PSNR 33 to 45 dB), each label map as a lossless PNG, instance maps only
with ``--instances`` (training does not read them; evaluation does). The training data of the shipped
model packs into about 26 MiB, which leaves room in a GPU machine's 64 MiB carry for the repository and
the wheels it lacks (``scripts/device_train.sh``).
``python -m training.train --config ... --pack .pack/data.zip`` then reads its sources from the pack
instead of their folders; a pack must hold every source the config names, made with the same
``boundary_width``.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training.config import SourceConfig
from training.data.sample import IGNORE, INFLAMMATORY, Sample

JPEG_QUALITY = 85
FORMAT = "nucseg-training-pack/1"
# label maps are stored as unsigned PNGs: value + offset
SEMANTIC_OFFSET, TERNARY_OFFSET = -INFLAMMATORY, -IGNORE
INDEX = "index.json"


class PackError(ValueError):
    """The pack cannot give what was asked (missing source, other boundary width, bad file)."""


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return buf.tobytes()


def _jpeg(rgb: np.ndarray) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), params)
    assert ok
    return buf.tobytes()


def _decode(data: bytes, flags: int) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if out is None:
        raise PackError("a pack member is not a readable image")
    return out


def _instances_png(instances: np.ndarray) -> bytes:
    if instances.max(initial=0) > np.iinfo(np.uint16).max:
        raise PackError(f"more than {np.iinfo(np.uint16).max} instances in one image cannot be packed")
    return _png(instances.astype(np.uint16))


def reading(src: SourceConfig) -> dict[str, Any]:
    """What decides a source's samples besides its folder: its kind, class map and grouping."""
    return src.model_dump(mode="json", include={"kind", "class_map", "group_pattern", "name"})


def write_pack(path: Path, sources: Iterable[tuple[SourceConfig, list[Sample]]], boundary_width: int, *,
               instances: bool = False) -> dict[str, int]:
    """Write the samples of each ``(source, samples)`` (their instance maps too with ``instances``);
    returns the sample count per source label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    index: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    read: dict[str, Any] = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for src, samples in sources:
            label = src.label
            counts[label], read[label] = len(samples), reading(src)
            for s in samples:
                key = f"{len(index):05d}"
                zf.writestr(f"{key}.image.jpg", _jpeg(s.image))
                zf.writestr(f"{key}.semantic.png", _png((s.semantic + SEMANTIC_OFFSET).astype(np.uint8)))
                zf.writestr(f"{key}.ternary.png", _png((s.ternary + TERNARY_OFFSET).astype(np.uint8)))
                keep = False
                if instances and s.instances is not None:
                    zf.writestr(f"{key}.instances.png", _instances_png(s.instances))
                    keep = True
                index.append({"key": key, "source": label, "name": s.name, "group": s.group, "dataset": s.dataset,
                              "instances": keep})
        meta = {"format": FORMAT, "boundary_width": boundary_width, "jpeg_quality": JPEG_QUALITY, "sources": read,
                "samples": index}
        zf.writestr(INDEX, json.dumps(meta))
    return counts


@dataclass
class Pack:
    """A pack opened for reading: ``samples(label)`` decodes one source's samples."""

    path: Path
    boundary_width: int
    read: dict[str, Any]
    entries: list[dict[str, Any]]

    @classmethod
    def open(cls, path: str | Path) -> Pack:
        path = Path(path)
        try:
            with zipfile.ZipFile(path) as zf:
                meta = json.loads(zf.read(INDEX))
        except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise PackError(f"{path} is not a training pack ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise PackError(f"{path} is a pack of format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(path, int(meta["boundary_width"]), dict(meta["sources"]), list(meta["samples"]))

    @property
    def sources(self) -> list[str]:
        """The source labels packed."""
        return sorted(self.read)

    def samples(self, src: SourceConfig, boundary_width: int) -> list[Sample]:
        """The samples packed for ``src`` (by its label), in their packed order; the pack must have read
        that source as the config does."""
        label = src.label
        if label not in self.read:
            raise PackError(f"{self.path} holds no source {label!r}; it holds {self.sources}")
        if boundary_width != self.boundary_width or reading(src) != self.read[label]:
            raise PackError(f"{self.path} read source {label!r} as {self.read[label]} with boundary_width "
                            f"{self.boundary_width}; the config reads it as {reading(src)} with {boundary_width}")
        entries = [e for e in self.entries if e["source"] == label]
        with zipfile.ZipFile(self.path) as zf:
            return [self._sample(zf, e) for e in entries]

    @staticmethod
    def _sample(zf: zipfile.ZipFile, e: dict[str, Any]) -> Sample:
        key = e["key"]
        image = _decode(zf.read(f"{key}.image.jpg"), cv2.IMREAD_COLOR)[..., ::-1].copy()
        sem = _decode(zf.read(f"{key}.semantic.png"), cv2.IMREAD_UNCHANGED).astype(np.int64) - SEMANTIC_OFFSET
        ter = _decode(zf.read(f"{key}.ternary.png"), cv2.IMREAD_UNCHANGED).astype(np.int64) - TERNARY_OFFSET
        inst = (_decode(zf.read(f"{key}.instances.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
                if e["instances"] else None)
        return Sample(e["name"], e["group"], e["dataset"], image, sem, ter, inst)


def main(argv: list[str] | None = None) -> int:
    """Pack every source of a training config."""
    from training.config import load_config
    from training.train import load_source  # training imports this module

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--instances", action="store_true", help="pack instance maps too (for evaluation)")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    width = cfg.data.boundary_width
    counts = write_pack(args.out, ((s, load_source(s, width)) for s in cfg.data.sources), width,
                        instances=args.instances)
    size = args.out.stat().st_size / 2**20
    print(f"{args.out}: {sum(counts.values())} samples ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
          f"{size:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
