"""Dataset adapters: folders on disk to lists of :class:`Sample`.

- :func:`load_monusac`: ``<patient>/<id>.{tif,svs,xml}``, or ``images/*.jpg`` + ``masks/*.png``
  (class masks without instances, :func:`load_monusac_masks`); group = patient.
- :func:`load_monuseg`: ``images/*.{jpg,png,tif}`` with ``annotations/<stem>.xml`` or
  ``binary_masks/<stem>.png``; group = image.
- :func:`load_instance_folder`: ``images/ + instances/ + classes/`` with a class-mapping table
  (CoNSeP); group from a regex on the file name (tiles of one source image share a group).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label as label_components
from skimage.measure import regionprops

from model.options import SEMANTIC_CLASSES
from training.data.rasterise import ternary_from_instances
from training.data.sample import IGNORE, Sample
from training.data.xml_reader import read_xml

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

# CoNSeP grouped classes -> our semantic head (README of ../shared/data): epithelial -> 1,
# inflammatory -> lymphocyte (2), other and spindle -> background (MoNuSAC convention).
CONSEP_CLASS_MAP: dict[int, int] = {0: 0, 1: 0, 2: 2, 3: 1, 4: 0}
N_SEMANTIC = len(SEMANTIC_CLASSES)
TCGA_PATIENT = re.compile(r"^(TCGA-[0-9A-Z]{2}-[0-9A-Z]{4})")


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 ``(H, W, 3)``; ``.svs`` through the model's slide reader."""
    if path.suffix.lower() == ".svs":
        from model.readers import open_slide

        reader = open_slide(path)
        try:
            w, h = reader.level_dimensions[0]
            return np.ascontiguousarray(reader.read_region(0, 0, 0, w, h)[..., :3])
        finally:
            reader.close()
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_monusac(root: str | Path, *, boundary_width: int = 2) -> list[Sample]:
    """A MoNuSAC folder: one sub-folder per patient holding ``<id>.tif|.svs`` and ``<id>.xml``,
    or ``images/`` + ``masks/`` class masks (:func:`load_monusac_masks`)."""
    root = Path(root)
    if (root / "masks").is_dir():
        return load_monusac_masks(root, boundary_width=boundary_width)
    samples = []
    for xml in sorted(root.glob("*/*.xml")):
        image_path = next((xml.with_suffix(s) for s in (".tif", ".tiff", ".svs", ".png")
                           if xml.with_suffix(s).is_file()), None)
        if image_path is None:
            raise FileNotFoundError(f"annotation {str(xml)!r} has no image beside it (.tif/.svs/.png)")
        image = read_rgb(image_path)
        maps = read_xml(xml, image.shape[:2], boundary_width=boundary_width)
        samples.append(Sample(xml.stem, xml.parent.name, "monusac", image, maps.semantic, maps.ternary,
                              maps.instances))
    if not samples:
        raise FileNotFoundError(f"no <patient>/<id>.xml files under {str(root)!r}")
    return samples


def patient_of(name: str) -> str:
    """The TCGA patient (``TCGA-TSS-PPPP``) of an image name, or the name itself."""
    match = TCGA_PATIENT.match(name)
    return match.group(1) if match else name


def load_monusac_masks(root: str | Path, *, boundary_width: int = 2) -> list[Sample]:
    """MoNuSAC class masks: ``images/<name>.jpg`` + ``masks/<name>.png`` (0 background, 1..4 types).

    Semantic = the mask. The masks have no instances, so "cells" are the connected components of
    each class (touching nuclei of one class are one). Ternary: those components as nuclei, with
    probable clumps IGNORE (as for binary masks); background pixels are IGNORE unless their
    haematoxylin density is low, since MoNuSAC leaves the other nucleus types unlabelled.
    """
    root = Path(root)
    samples = []
    for path in _images(root / "images"):
        image = read_rgb(path)
        mask_path = root / "masks" / f"{path.stem}.png"
        if not mask_path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} has no class mask {str(mask_path)!r}")
        semantic = np.asarray(Image.open(mask_path)).astype(np.int64)
        if semantic.shape != image.shape[:2] or semantic.min() < 0 or semantic.max() >= N_SEMANTIC:
            raise ValueError(f"{mask_path.name}: expected {image.shape[:2]} values 0..{N_SEMANTIC - 1}, "
                             f"got {semantic.shape} values {sorted(np.unique(semantic).tolist())[:8]}")
        instances = class_components(semantic)
        clumps = [i for c in range(1, N_SEMANTIC) for i in _clump_ids(np.where(semantic == c, instances, 0))]
        ternary = _nucleus_ternary(instances, boundary_width, clumps)
        ternary[(semantic == 0) & ~_low_haematoxylin(image, semantic > 0)] = IGNORE
        samples.append(Sample(path.stem, patient_of(path.stem), "monusac", image, semantic, ternary, instances))
    return samples


def class_components(semantic: np.ndarray) -> np.ndarray:
    """Instance ids (int32) from the 4-connected components of each class 1..N-1 separately."""
    out = np.zeros(semantic.shape, dtype=np.int32)
    offset = 0
    for c in range(1, N_SEMANTIC):
        comp = label_components(semantic == c, connectivity=1)
        n = int(comp.max())
        out[comp > 0] = comp[comp > 0] + offset
        offset += n
    return out


def _low_haematoxylin(image: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Pixels whose haematoxylin density lies below nearly all labelled nuclei (surely no nucleus)."""
    h = rgb2hed(image)[..., 0]
    if nuclei.sum() >= 500:
        return np.asarray(h < np.percentile(h[nuclei], 5))
    return np.asarray(h < threshold_otsu(h))


def load_monuseg(root: str | Path, *, boundary_width: int = 2) -> list[Sample]:
    """MoNuSeg: nuclei of unknown class, so ``semantic`` is IGNORE on nuclei and 0 elsewhere."""
    root = Path(root)
    samples = []
    for path in _images(root / "images"):
        image = read_rgb(path)
        xml = root / "annotations" / f"{path.stem}.xml"
        mask = root / "binary_masks" / f"{path.stem}.png"
        if xml.is_file():
            maps = read_xml(xml, image.shape[:2], classes={}, boundary_width=boundary_width)
            semantic, ternary, instances = maps.semantic, maps.ternary, maps.instances
        elif mask.is_file():
            semantic, ternary = _from_binary_mask(np.asarray(Image.open(mask)) > 0, boundary_width)
            instances = None
        else:
            raise FileNotFoundError(f"image {str(path)!r} has neither {xml.name!r} nor {mask.name!r}")
        samples.append(Sample(path.stem, path.stem, "monuseg", image, semantic, ternary, instances))
    return samples


def _from_binary_mask(mask: np.ndarray, boundary_width: int, clump_factor: float = 2.5,
                      min_solidity: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """Labels from a 0/1 mask without instances.

    Connected components stand in for nuclei. Components that are probably clumps of touching
    nuclei (area > ``clump_factor`` x median, or solidity < ``min_solidity``) have unknown inner
    boundaries, so their pixels are IGNORE in the ternary map.
    """
    components = label_components(mask, connectivity=1).astype(np.int32)
    ternary = _nucleus_ternary(components, boundary_width, _clump_ids(components, clump_factor, min_solidity))
    semantic = np.where(mask, IGNORE, 0).astype(np.int64)
    return semantic, ternary


def _clump_ids(components: np.ndarray, clump_factor: float = 2.5, min_solidity: float = 0.85) -> list[int]:
    """Components that are probably clumps of touching nuclei (large for their set, or concave)."""
    props = regionprops(components)
    if not props:
        return []
    median = float(np.median([p.area for p in props]))
    return [p.label for p in props if p.area > clump_factor * median or p.solidity < min_solidity]


def _nucleus_ternary(components: np.ndarray, boundary_width: int, clumps: list[int]) -> np.ndarray:
    """Ternary map of components that stand in for nuclei, with the ``clumps`` IGNORE."""
    ternary = ternary_from_instances(components, boundary_width)
    ternary[np.isin(components, clumps)] = IGNORE
    return ternary


def load_instance_folder(
    root: str | Path,
    *,
    class_map: Mapping[int, int],
    group_pattern: str = r"^(.*)_\d+$",
    dataset: str = "consep",
    boundary_width: int = 2,
) -> list[Sample]:
    """``images/`` + ``instances/`` (uint16 ids) + ``classes/`` (source class per pixel)."""
    root = Path(root)
    samples = []
    for path in _images(root / "images"):
        image = read_rgb(path)
        instances = np.asarray(Image.open(root / "instances" / f"{path.stem}.png")).astype(np.int32)
        classes = np.asarray(Image.open(root / "classes" / f"{path.stem}.png")).astype(np.int64)
        semantic = _map_classes(classes, class_map, path)
        semantic[(instances == 0)] = 0
        ternary = ternary_from_instances(instances, boundary_width)
        match = re.match(group_pattern, path.stem)
        group = match.group(1) if match else path.stem
        samples.append(Sample(path.stem, group, dataset, image, semantic, ternary, instances))
    return samples


def _map_classes(classes: np.ndarray, class_map: Mapping[int, int], path: Path) -> np.ndarray:
    unknown = sorted(set(np.unique(classes).tolist()) - set(class_map))
    if unknown:
        raise ValueError(f"{path.name}: class values {unknown} are not in the class map {dict(class_map)}")
    lut = np.full(int(classes.max()) + 1, IGNORE, dtype=np.int64)
    for src, dst in class_map.items():
        if src < lut.size:
            lut[src] = dst
    return lut[classes]
