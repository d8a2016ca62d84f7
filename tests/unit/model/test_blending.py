"""The torch blending (the engine's, on any device) equals the former numpy blending."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.blending import Accumulator, Workspace, class_maps, first_argmax, gaussian_weights, nucleus_maps, region_maps
from model.tiling import TileGrid, plan_blocks
from tests.helpers import numpy_blending
from tests.unit.model.test_engine_stitching import SIZES, TILE_OVERLAPS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("tile", "overlap"), TILE_OVERLAPS)
@pytest.mark.parametrize("size", SIZES)
def test_torch_blending_equals_numpy_blending(device: str, tile: int, overlap: int, size: tuple[int, int]) -> None:
    height, width = size
    grid = TileGrid(tile, overlap, width, height)
    rng = np.random.default_rng(tile * 1000 + width)
    keys = grid.tiles_touching(grid.bounds)
    tiles = [(grid.tile_box(*k), rng.normal(0, 3, (8, tile, tile)).astype(np.float32)) for k in keys]
    np_weights = numpy_blending.gaussian_weights(tile)
    weights = gaussian_weights(tile, 0.25, device)
    np.testing.assert_allclose(weights.cpu().numpy(), np_weights, atol=1e-7, rtol=0)
    for region in plan_blocks(width, height, 45):
        expected, expected_covered = numpy_blending.blend(region, tiles, np_weights)
        acc = Accumulator(region, 8, device)
        for box, logits in tiles:
            acc.add(box, torch.from_numpy(logits).to(device), weights)
        values, covered = acc.result()
        np.testing.assert_allclose(values.cpu().numpy(), expected, atol=1e-5, rtol=0)
        assert (covered.cpu().numpy() == expected_covered).all()
        maps = class_maps(values, covered, 5).cpu().numpy()
        assert (maps[0] == np.where(expected_covered, expected[:5].argmax(0), 0)).all()
        assert (maps[1] == np.where(expected_covered, expected[5:].argmax(0), 0)).all()


def test_class_maps_break_ties_towards_the_lower_class_and_zero_the_uncovered() -> None:
    values = torch.zeros((8, 1, 3))
    values[2, 0, 1] = values[4, 0, 1] = 1.0  # semantic tie 2 / 4 -> 2
    values[7, 0, 2] = 1.0
    covered = torch.tensor([[True, True, False]])
    maps = class_maps(values, covered, 5).numpy()
    assert maps.dtype == np.uint8
    assert maps.tolist() == [[[0, 2, 0]], [[0, 0, 0]]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [2, 3, 5, 8])
def test_first_argmax_equals_numpy_argmax_with_many_ties(device: str, channels: int) -> None:
    rng = np.random.default_rng(channels)
    planes = rng.integers(0, 3, (channels, 64, 48)).astype(np.float32)  # most pixels hold a tie
    index = first_argmax(torch.from_numpy(planes).to(device)).cpu().numpy()
    assert index.dtype == np.uint8
    np.testing.assert_array_equal(index, planes.argmax(0))


def test_a_reserved_workspace_hands_out_zeroed_views_of_one_buffer() -> None:
    workspace = Workspace()
    workspace.reserve(9 * 40 * 50)
    first = workspace.take(9, 30, 50)
    first.fill_(3.0)
    second = workspace.take(9, 40, 50)  # larger, still within the reservation: no new buffer
    assert second.data_ptr() == first.data_ptr() and second.shape == (9, 40, 50)
    assert bool((second == 0).all())
    third = workspace.take(9, 41, 50)  # beyond it: grows, and is still zeroed
    assert third.shape == (9, 41, 50) and bool((third == 0).all())


@pytest.mark.parametrize("rows", [1, 7, 32, 45, None])  # 45: the whole region; None: the CPU default
def test_region_maps_in_bands_equal_the_whole_region_maps(rows: int | None) -> None:
    rng = np.random.default_rng(5)
    values = torch.from_numpy(rng.normal(0, 3, (8, 45, 31)).astype(np.float32))
    covered = torch.from_numpy(rng.random((45, 31)) > 0.1)
    expected_classes = class_maps(values, covered, 5)
    expected_probs = nucleus_maps(values.clone(), 5)
    classes, probs = region_maps(values.clone(), covered, 5, probs=True, rows=rows)
    assert probs is not None and torch.equal(classes, expected_classes) and torch.equal(probs, expected_probs)
    classes, probs = region_maps(values.clone(), covered, 5, probs=False, rows=rows)
    assert probs is None and torch.equal(classes, expected_classes)
    weights = torch.from_numpy(rng.uniform(0.2, 3.0, (45, 31)).astype(np.float32))  # the sums divided band by band
    classes, probs = region_maps(values * weights, covered, 5, probs=True, rows=rows, weights=weights)
    expected_probs = nucleus_maps(values * weights / weights, 5)
    assert probs is not None and torch.equal(classes, class_maps(values * weights / weights, covered, 5))
    assert torch.equal(probs, expected_probs)
