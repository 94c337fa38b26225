"""InternVL dynamic tiling: the pure function (remote-code family) against transformers' image processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcot.data.tiling import HFTiler, InternVLChatTiler, candidate_grids, dynamic_tiles, num_tiles, tile_grid

transformers = pytest.importorskip("transformers")
try:  # transformers >= 5
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
except ImportError:  # transformers 4.x
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

# Odd, tall, wide, tiny, huge and exactly-tied sizes (aspect at the midpoint of two grids).
SIZES = [(1, 1), (7, 3), (448, 448), (449, 447), (1000, 300), (300, 1000), (896, 448), (1344, 448), (2000, 100),
         (100, 2000), (3000, 2000), (800, 1100), (1792, 1792), (5000, 5000), (448 * 5, 448), (1250, 1000), (1500, 1000)]


def _random_sizes(n: int) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    return [tuple(int(v) for v in torch.randint(1, 4000, (2,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("max_tiles", [1, 2, 6, 12, 40])
def test_grid_and_count_match_transformers(max_tiles):
    hf = HFTiler()
    for width, height in SIZES + _random_sizes(200):
        expected = get_optimal_tiled_canvas((height, width), (448, 448), 1, max_tiles)
        assert tile_grid(width, height, max_tiles=max_tiles) == expected, (width, height, max_tiles)
        n = num_tiles(width, height, max_tiles=max_tiles)
        assert n == hf.num_tiles(width, height, max_tiles) == InternVLChatTiler().num_tiles(width, height, max_tiles)
        cols, rows = expected
        assert n == (1 if cols * rows == 1 else cols * rows + 1)


def test_grid_respects_min_tiles_and_ties():
    # min_tiles > 1 excludes the single tile; the area rule decides ties between equal-aspect grids.
    assert tile_grid(448, 448, min_tiles=2, max_tiles=12) == get_optimal_tiled_canvas((448, 448), (448, 448), 2, 12)
    assert tile_grid(448, 448, max_tiles=12) == (1, 1)          # area 1 tile: not more than half of 2x2
    assert tile_grid(900, 900, max_tiles=12) == (2, 2)          # fills over half of 2x2, not of 3x3
    assert tile_grid(1400, 1400, max_tiles=12) == (3, 3)
    # The order within one tile count never decides the grid when min_tiles == 1: at every tie
    # between two same-count grids, some other grid is strictly closer.
    grids = candidate_grids(1, 12)
    for a in grids:
        for b in grids:
            if a != b and a[0] * a[1] == b[0] * b[1]:
                mid = (a[0] / a[1] + b[0] / b[1]) / 2
                assert min(abs(mid - c / r) for c, r in grids) < abs(mid - a[0] / a[1])


@pytest.mark.parametrize("size", [(1000, 300), (300, 300), (449, 1201)])
@pytest.mark.parametrize("max_tiles", [1, 6])
def test_pixels_match_transformers_processor(size, max_tiles):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours, theirs = InternVLChatTiler()(img, max_tiles), HFTiler()(img, max_tiles)
    assert ours.shape == theirs.shape == (num_tiles(*size, max_tiles=max_tiles), 3, 448, 448)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_tiles_are_row_major_crops_then_thumbnail():
    # A 2x1 image whose left half is black and right half white: tile 0 black, tile 1 white,
    # the thumbnail half and half.
    img = Image.new("RGB", (896, 448), (0, 0, 0))
    img.paste((255, 255, 255), (448, 0, 896, 448))
    tiles = dynamic_tiles(img, max_tiles=12)
    assert len(tiles) == 3 and all(t.size == (448, 448) for t in tiles)
    means = [np.asarray(t).mean() for t in tiles]
    assert means[0] < 1 and means[1] > 254 and 120 < means[2] < 135


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tiles=0"):
        tile_grid(10, 10, max_tiles=0)
    with pytest.raises(ValueError, match="min_tiles=0"):
        tile_grid(10, 10, min_tiles=0)
    with pytest.raises(ValueError, match="image size 0x10"):
        tile_grid(0, 10)
    with pytest.raises(TypeError, match="image_processor=object"):
        HFTiler(object())
