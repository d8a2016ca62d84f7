"""Instances, classes and measurements from the two heads (pure functions)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely
from scipy import ndimage
from skimage.segmentation import watershed

from model.blending import nucleus_inputs
from model.errors import OptionsError
from model.postprocess import (
    Nuclei,
    PostprocessParams,
    _boxes,
    _Components,
    _CropStack,
    _first_pixels,
    _label,
    _largest_polygon,
    _mitred_offsets,
    _outer_contour,
    _outer_contours,
    _owned,
    _pixel_edges,
    _ring_geometries,
    _simplified,
    classify,
    find_nuclei,
    instance_labels,
    measure_nuclei,
    nucleus_margin_px,
    nucleus_polygons,
)
from model.tiling import Box
from tests.helpers.nuclei_stubs import Nucleus, exact_logits, paint, ternary_of


def _nuclei(sem: np.ndarray, ter: np.ndarray, **kwargs: object) -> Nuclei:
    return find_nuclei(*nucleus_inputs(sem, ter), mpp=0.25, **kwargs)  # type: ignore[arg-type]


def _labels(ter: np.ndarray, *, mpp: float = 0.25, **kwargs: object) -> np.ndarray:
    ternary, probs = nucleus_inputs(np.zeros((5, *ter.shape[1:]), np.float32), ter)
    return instance_labels(ternary, probs[-1], mpp=mpp, **kwargs)  # type: ignore[arg-type]


def _disc(cx: float, cy: float, r: float, sem: int = 1) -> Nucleus:
    return Nucleus(cx, cy, r, r, 0.0, sem)


def test_touching_nuclei_are_split_by_the_boundary_class():
    nuclei = [_disc(30, 30, 12), _disc(54, 30, 12, sem=2), _disc(42, 52, 11, sem=3)]  # all touching
    labels = paint(90, 90, nuclei)
    sem, ter = exact_logits(labels, nuclei)
    found = _nuclei(sem, ter)
    assert found.n == 3
    truth = np.bincount(labels.ravel())[1:]
    assert sorted(found.area_px) == sorted(truth)  # rims go back to their own nucleus
    assert sorted(found.class_index) == [0, 1, 2]


def test_min_area_is_physical():
    nuclei = [_disc(20, 20, 4.0), _disc(60, 20, 10.0)]  # 50 px and 314 px
    labels = paint(40, 80, nuclei)
    _, ter = exact_logits(labels, nuclei)
    # 50 px is 3.1 µm² at 0.25 µm/px (dropped, < 8 µm²) but 12.5 µm² at 0.5 µm/px (kept)
    assert _labels(ter, mpp=0.25).max() == 1
    assert _labels(ter, mpp=0.5).max() == 2
    assert _labels(ter, mpp=0.25, params=PostprocessParams(min_area_um2=0)).max() == 2


def test_nucleus_without_inside_pixels_is_kept_and_specks_do_not_seed():
    ter = np.zeros((3, 30, 30), dtype=np.float32)
    ter[0] = 1.0
    ter[2, 5:20, 5:20] = 2.0  # all boundary: no seed
    ter[1, 10, 10] = 3.0  # a one-pixel inside speck (< min_seed_um2) inside it
    labels = _labels(ter)
    assert labels.max() == 1 and (labels > 0).sum() == 15 * 15


def test_logits_and_probabilities_give_the_same_nuclei():
    rng = np.random.default_rng(3)
    nuclei = [_disc(25, 25, 12), _disc(48, 25, 11, sem=4)]
    labels = paint(60, 80, nuclei)
    sem, ter = exact_logits(labels, nuclei)
    sem = sem + rng.normal(0, 2, sem.shape).astype(np.float32)
    ter = ter + rng.normal(0, 2, ter.shape).astype(np.float32)
    a = _nuclei(sem, ter)
    b = find_nuclei(*nucleus_inputs(_softmax(sem), _softmax(ter), logits=False), mpp=0.25)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.mean_prob, b.mean_prob, atol=0.5 / 255)  # rounding to 1/255 may differ


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def test_probabilities_are_quantised_to_a_255th_and_the_uncovered_are_background():
    rng = np.random.default_rng(5)
    sem, ter = rng.normal(0, 3, (5, 16, 16)).astype(np.float32), rng.normal(0, 3, (3, 16, 16)).astype(np.float32)
    valid = np.ones((16, 16), bool)
    valid[:, :4] = False
    ternary, probs = nucleus_inputs(sem, ter, valid=valid)
    assert ternary.dtype == probs.dtype == np.uint8 and probs.shape == (6, 16, 16)
    np.testing.assert_array_equal(ternary[:, 4:], ter.argmax(0)[:, 4:])
    assert (ternary[:, :4] == 0).all()
    np.testing.assert_allclose(probs[:5] / 255, _softmax(sem), atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(probs[5] / 255, _softmax(ter)[1], atol=0.5 / 255 + 1e-6)


def test_classify_other_when_background_beats_every_cell_type():
    mean = np.array([
        [0.50, 0.20, 0.10, 0.10, 0.10],  # background wins: other
        [0.30, 0.30, 0.20, 0.10, 0.10],  # tie with epithelial: the cell type
        [0.10, 0.10, 0.60, 0.10, 0.10],  # lymphocyte
    ])
    cls, conf = classify(mean)
    assert cls.tolist() == [4, 0, 1]
    np.testing.assert_allclose(conf, [0.5, 0.3, 0.6])


def test_centroid_and_polygon_in_level0_coordinates():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[10:20, 4:24] = 1  # 20 x 10 rectangle: centre (14, 15) in continuous coordinates
    sem, ter = np.zeros((5, 40, 40), np.float32), np.zeros((3, 40, 40), np.float32)
    ter[0] = 1.0
    ter[1][labels > 0] = 2.0
    found = _nuclei(sem, ter, params=PostprocessParams(min_area_um2=0))
    np.testing.assert_allclose(found.centroid_xy[0], [14.0, 15.0])
    poly = nucleus_polygons(found.labels, np.array([1]), origin=(100, 200), scale=2.0)[0]
    minx, miny, maxx, maxy = poly.bounds
    assert (minx, miny) == pytest.approx((208, 420), abs=1.01) and (maxx, maxy) == pytest.approx((248, 440), abs=1.01)
    assert poly.is_valid and poly.exterior.is_ccw


def test_ternary_of_marks_rims():
    labels = paint(20, 20, [_disc(10, 10, 6)])
    ter = ternary_of(labels)
    assert set(np.unique(ter)) == {0, 1, 2}
    assert (ter[labels == 0] == 0).all()


def test_margin_and_params_validation():
    assert nucleus_margin_px(0.25) == 128 and nucleus_margin_px(0.5) == 64
    with pytest.raises(OptionsError, match="mpp must be positive, got 0"):
        nucleus_margin_px(0)
    with pytest.raises(OptionsError, match=r"min_area_um2 .* got -1"):
        PostprocessParams(min_area_um2=-1).validate()
    with pytest.raises(ValueError, match=r"\(3, h, w\), got shape \(2, 4, 4\)"):
        nucleus_inputs(np.zeros((5, 4, 4)), np.zeros((2, 4, 4)))


def test_measurements_equal_per_label_means():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 40, (64, 96)).astype(np.int32)
    labels[labels == 7] = 0  # a label with no pixels
    probs = rng.integers(0, 256, (5, 64, 96)).astype(np.uint8)
    found = measure_nuclei(labels, probs)
    ids = np.setdiff1d(np.arange(1, 40), [7])
    expected = np.stack([ndimage.mean(probs[k].astype(np.float64), labels, ids) for k in range(5)], axis=1) / 255
    np.testing.assert_allclose(found.mean_prob[ids - 1], expected, rtol=1e-12)
    np.testing.assert_array_equal(found.area_px[ids - 1], ndimage.sum_labels(np.ones_like(labels), labels, ids))
    rows, cols = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, ids)).T
    np.testing.assert_allclose(found.centroid_xy[ids - 1], np.stack([cols, rows], axis=1) + 0.5)


def test_pixel_edge_outlines_equal_the_mitred_buffer():
    rng = np.random.default_rng(17)
    blobs = ndimage.gaussian_filter(rng.normal(size=(300, 300)), 2.5) > 0.05  # lobes, necks, spikes, pinches
    labels, n = ndimage.label(blobs)
    boxes = _boxes(labels, n).tolist()
    rings = [_outer_contour(labels, i, boxes[i]) for i in range(1, n + 1)]
    rings += [np.array([[5, 5]]), np.array([[5, 5], [6, 5]])]  # a pixel, a two-pixel line
    grown = _pixel_edges(rings)
    reference = shapely.buffer(_ring_geometries(rings), 0.5, cap_style="square", join_style="mitre", mitre_limit=2.0)
    assert shapely.area(shapely.symmetric_difference(grown, reference)).max() < 1e-9
    wide = [r for r in rings if len(r) >= 3]
    _, exact = _mitred_offsets(np.concatenate(wide) + 0.5, np.array([len(r) for r in wide]), 0.5)
    assert 0.5 < exact.mean() < 1  # both the numpy offsets and the GEOS fallback are exercised
    assert shapely.area(grown[-2]) == 1.0


def _random_region_rings(seed: int, count: int, sides: tuple[int, int], blur: tuple[float, float],
                         spread: float) -> list[np.ndarray]:
    """Outer contours of the 4-connected regions of ``count`` random fields, smooth and ragged."""
    rng = np.random.default_rng(seed)
    rings = []
    for _ in range(count):
        side = int(rng.integers(*sides))
        field = ndimage.gaussian_filter(rng.normal(size=(side, side)), rng.uniform(*blur))
        labels, n = ndimage.label(np.pad(field > rng.uniform(-spread, spread), 1))
        boxes = _boxes(labels, n).tolist()
        rings += [_outer_contour(labels, i, boxes[i]) for i in range(1, n + 1)]
    return rings


def test_offsets_called_exact_are_simple_rings_equal_to_the_buffer():
    """The numpy offsets skip GEOS's validity check: on thousands of random 4-connected regions
    (smooth and ragged), every ring they call exact is a valid polygon equal to the mitred buffer."""
    rings = [r for r in _random_region_rings(3, 1500, (6, 40), (0.6, 2.5), 0.2) if len(r) >= 3]
    polys, exact = _mitred_offsets(np.concatenate(rings) + 0.5, np.array([len(r) for r in rings]), 0.5)
    assert exact.sum() > 1000
    assert shapely.is_valid(polys[exact]).all()
    reference = shapely.buffer(_ring_geometries([r for r, e in zip(rings, exact, strict=True) if e]), 0.5,
                               cap_style="square", join_style="mitre", mitre_limit=2.0)
    assert shapely.area(shapely.symmetric_difference(polys[exact], reference)).max() < 1e-9


def _noisy_maps(seed: int, shape: tuple[int, int] = (160, 200)) -> tuple[np.ndarray, np.ndarray]:
    """Ternary argmax and uint8 maps with many touching, speckled and tiny objects and tied values."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    ternary = np.where(field > 0.12, 1, np.where(field > 0.02, 2, 0)).astype(np.uint8)
    probs = rng.integers(0, 256, (6, *shape)).astype(np.uint8)
    probs[-1] = np.clip(field * 600 + 128, 0, 255).astype(np.uint8) // 8 * 8  # coarse: plateaus and ties
    return ternary, probs


def _crop_problems(tied: bool) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Elevations, markers and masks of noisy crops: coarse uint8 elevations (plateaus and ties) or
    distinct random ones (no ties)."""
    elevations, markers, masks = [], [], []
    for seed, shape in enumerate([(70, 90), (40, 25), (1, 30), (66, 91)]):
        ternary, probs = _noisy_maps(seed, shape)
        masks.append(ternary > 0)
        markers.append(np.where(ternary == 1, ndimage.label(ternary == 1)[0], 0).astype(np.int32))
        distinct = np.random.default_rng(seed).permutation(ternary.size).reshape(shape).astype(np.float64)
        elevations.append(255 - probs[-1] if tied else distinct)
    return elevations, markers, masks


def _flooded(elevations: list[np.ndarray], markers: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
    stack = _CropStack(masks, elevations, markers)
    stack.flood()
    return stack.crops()


def test_crop_watershed_equals_scikit_image_without_ties():
    """Crops flooded together, or one alone, get what each gets alone from scikit-image."""
    elevations, markers, masks = _crop_problems(tied=False)
    expected = [watershed(e, m, connectivity=1, mask=k) for e, m, k in zip(elevations, markers, masks, strict=True)]
    for got, want in zip(_flooded(elevations, markers, masks), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_flooded(elevations[:1], markers[:1], masks[:1])[0], expected[0])


def test_crop_watershed_with_ties_is_a_watershed_of_the_markers():
    """With plateaus, ties may go another way than scikit-image's (its heap order), but the markers
    keep their pixels, the whole mask is labelled, each region stays 4-connected with its marker, and
    nearly every pixel agrees."""
    elevations, markers, masks = _crop_problems(tied=True)
    flooded = _flooded(elevations, markers, masks)
    agree = total = 0
    for e, m, k, got in zip(elevations, markers, masks, flooded, strict=True):
        want = watershed(e, m, connectivity=1, mask=k)
        np.testing.assert_array_equal(got[m > 0], m[m > 0])
        np.testing.assert_array_equal(got > 0, want > 0)  # the pixels the markers reach
        for label in np.unique(got[got > 0]).tolist():
            assert ndimage.label(got == label)[1] == 1
        agree, total = agree + int((got == want)[k].sum()), total + int(k.sum())
    assert agree / total > 0.99
    assert agree < total  # the plateaus do make some ties go another way: the check above is not vacuous

def test_instance_measurements_equal_counting_the_pixels():
    """Area and centroid kept from the components and the split crops equal those counted on the
    final labels, to the bit; each box holds its nucleus."""
    for seed in range(3):
        ternary, probs = _noisy_maps(seed)
        found = find_nuclei(ternary, probs, mpp=0.25, params=PostprocessParams(min_area_um2=2.0))
        counted = measure_nuclei(found.labels, probs[:-1])
        assert found.n > 20 and found.n == counted.n
        for name in ("area_px", "centroid_xy", "mean_prob", "class_index", "confidence"):
            np.testing.assert_array_equal(getattr(found, name), getattr(counted, name), err_msg=name)
        assert (found.box[:, :2] <= counted.box[:, :2]).all() and (found.box[:, 2:] >= counted.box[:, 2:]).all()
        assert (found.box != counted.box).any()  # split nuclei carry their component's box


@pytest.mark.parametrize("keep", [Box(40, 30, 120, 100), Box(0, 0, 60, 200), Box(120, 100, 200, 160)])
def test_nuclei_kept_in_a_box_equal_those_of_the_whole_region(keep):
    """With ``keep``, the nuclei whose centroid lies in it are those found without it, pixel for
    pixel and measurement for measurement; only their numbering may differ."""
    ternary, probs = _noisy_maps(3)
    whole = find_nuclei(ternary, probs, mpp=0.25, params=PostprocessParams(min_area_um2=2.0))
    part = find_nuclei(ternary, probs, mpp=0.25, params=PostprocessParams(min_area_um2=2.0), keep=keep)
    kept = [np.flatnonzero(_owned(n.centroid_xy, keep)) for n in (whole, part)]
    assert len(kept[0]) == len(kept[1]) > 10
    order = [k[np.lexsort(n.centroid_xy[k].T)] for n, k in zip((whole, part), kept, strict=True)]
    for name in ("area_px", "centroid_xy", "mean_prob", "class_index", "confidence", "box"):
        np.testing.assert_array_equal(getattr(whole, name)[order[0]], getattr(part, name)[order[1]], err_msg=name)
    for a, b in zip(*order, strict=True):
        np.testing.assert_array_equal(whole.labels == a + 1, part.labels == b + 1)
    assert part.n < whole.n  # components away from the box were left unsplit: the window did something


def test_first_pixels_hold_their_label_whatever_the_numbering():
    ternary, _ = _noisy_maps(5)
    labels, n = _label(ternary == 1)
    px = np.flatnonzero(labels)
    for numbering in (np.arange(n + 1), np.concatenate([[0], np.random.default_rng(0).permutation(n) + 1])):
        relabelled = numbering[labels]
        at = relabelled.ravel()[px]
        first = _first_pixels(at, px, n)
        assert n > 20 and (relabelled.ravel()[first[1:]] == np.arange(1, n + 1)).all()


def test_component_statistics_from_row_runs_equal_opencv():
    """Pixel counts, centroids and boxes from the runs along rows equal OpenCV's statistics pass, to
    the bit, on ragged masks (one-pixel rows and columns, components touching the edges, none at all)."""
    rng = np.random.default_rng(11)
    masks = [np.zeros((4, 6), bool), np.ones((3, 1), bool), np.ones((1, 9), bool)]
    for _ in range(60):
        shape = tuple(rng.integers(1, 80, 2))
        field = ndimage.gaussian_filter(rng.normal(size=shape), rng.uniform(0.3, 2.5))
        masks.append(field > rng.uniform(-0.3, 0.3))
    for mask in masks:
        comps = _Components.of(mask)
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4,
                                                                            ltype=cv2.CV_32S)
        x, y, w, h = stats[1:, :4].T
        assert comps.n == count - 1
        np.testing.assert_array_equal(comps.labels, labels)
        np.testing.assert_array_equal(comps.area[1:], stats[1:, cv2.CC_STAT_AREA])
        np.testing.assert_array_equal(comps.centroid[1:], centroids[1:] + 0.5)
        np.testing.assert_array_equal(comps.box[1:], np.stack([y, x, y + h, x + w], axis=1))


def test_contours_traced_together_equal_those_traced_one_by_one():
    """The whole-foreground trace gives each nucleus the points of its own trace: nuclei standing
    apart, touching ones (split components), 4-components meeting at a corner, a nucleus in
    another's hole, labels in two parts; for all nuclei and for subsets whose boxes leave others out."""
    ternary, probs = _noisy_maps(7, (200, 240))
    labels = find_nuclei(ternary, probs, mpp=0.25, params=PostprocessParams(min_area_um2=2.0)).labels
    labels[:, 30:32] = 0  # cuts some nuclei in two
    labels = np.pad(labels, ((0, 0), (0, 100)))  # a blank band for the drawn cases
    n, c = int(labels.max()), 250
    labels[150:157, c + 10:c + 17] = n + 1  # a ring with a nucleus in its hole
    labels[152:155, c + 12:c + 15] = n + 2
    labels[153, c + 13] = 0
    labels[150:153, c + 20:c + 23] = n + 3  # two squares meeting at a corner
    labels[153:156, c + 23:c + 26] = n + 4
    labels[160:165, c + 40:c + 45] = labels[170:176, c + 50:c + 54] = n + 5  # two parts apart: a square ...
    labels[170:173, c + 50:c + 52] = 0  # ... and a longer outline
    labels[180:184, c + 60:c + 64] = labels[180:184, c + 70:c + 80] = n + 6  # two parts, one touching n + 7
    labels[180:184, c + 80:c + 84] = n + 7
    labels, n = labels.astype(np.int32), n + 7
    boxes = _boxes(labels, n)
    alone = [_outer_contour(labels, i, boxes[i].tolist()) for i in range(1, n + 1)]
    ids = np.arange(1, n + 1)
    for subset in (ids, ids[::3], ids[-4:]):
        together = _outer_contours(labels, subset, boxes[subset])
        assert len(together) == len(subset)
        for i, ring in zip(subset.tolist(), together, strict=True):
            np.testing.assert_array_equal(ring, alone[i - 1], err_msg=f"label {i}")
    contours, _ = cv2.findContours((labels > 0).view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    single = sum(len(np.unique(labels[c[:, 0, 1], c[:, 0, 0]])) == 1 for c in contours)
    assert 20 < single < n - 20  # both ways are taken: many joint traces, many nuclei traced alone


@pytest.mark.parametrize("tolerance", [0.5, 1.5])
def test_simplified_rings_keep_the_points_geos_keeps_for_polygons(tolerance):
    """Simplifying the exteriors keeps the very points GEOS's polygon simplification keeps, wherever
    that gives a valid polygon; rings that collapse come back empty (to be redone)."""
    raw = _pixel_edges(_random_region_rings(5, 800, (4, 40), (0.4, 2.5), 0.3), (300.0, 700.0), 2.0)
    raw = shapely.polygons(shapely.get_exterior_ring(np.array([_largest_polygon(g) for g in raw])))
    ours, geos = _simplified(raw, tolerance), shapely.simplify(raw, tolerance, preserve_topology=False)
    valid = shapely.is_valid(ours) & ~shapely.is_empty(ours)
    assert all(shapely.equals_identical(a, b) for a, b in zip(ours[valid], geos[valid], strict=True))
    np.testing.assert_array_equal(shapely.is_empty(ours), shapely.is_empty(geos))
    assert valid.sum() > 1000 and (tolerance < 1 or (~valid).sum() > 100)

