"""InternVL dynamic tiling: an image becomes aspect-ratio matched square tiles plus a thumbnail.

InternVL (1.5 onwards) cuts an image into a ``cols x rows`` grid of ``tile_size`` tiles, the grid
chosen among those with ``min_tiles <= cols * rows <= max_tiles`` tiles so that ``cols / rows``
is closest to the image's aspect ratio; on an exact tie the grid with more tiles wins while the
image covers more than half of its canvas. When the grid has more than one tile, the whole
image resized to one tile (the thumbnail) is appended after the tiles, which are in row-major
order. So an image gives 1 tile, or ``cols * rows + 1``.

Two implementations of one contract:

- :class:`HFTiler` runs a transformers image processor that does this tiling itself
  (``GotOcr2ImageProcessor`` / ``GotOcr2ImageProcessorPil`` with ``crop_to_patches=True``, what
  ``InternVLProcessor`` uses for the transformers-native family). Its ``max_patches`` counts
  the grid's tiles, thumbnail excluded, like ``max_tiles`` here.
- :func:`dynamic_tiles` + :class:`InternVLChatTiler`: the same tiling as a pure function, for
  OpenGVLab's remote-code family, whose checkpoints ship no image processor (their model card's
  ``load_image`` and ``internvl_chat/internvl/train/dataset.py`` do it by hand).

Both pick the grid with :func:`tile_grid`; tests check that they agree with transformers'
``get_optimal_tiled_canvas`` on tile count and grid.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

# InternVL normalises with the ImageNet statistics (transformers' -hf checkpoints ship them too).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_tiles(min_tiles: object, max_tiles: object) -> None:
    if not isinstance(min_tiles, int) or isinstance(min_tiles, bool) or min_tiles < 1:
        raise ValueError(f"min_tiles={min_tiles!r}: expected an int >= 1")
    if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < min_tiles:
        raise ValueError(f"max_tiles={max_tiles!r}: expected an int >= min_tiles ({min_tiles})")


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All ``(cols, rows)`` grids with ``min_tiles <= cols * rows <= max_tiles``, fewest tiles first.

    Within one tile count the order is by ``cols`` (transformers' order). It only matters on an
    exact tie between two grids with the same tile count, which never decides the result when
    ``min_tiles == 1`` (a square-er grid in between is always closer).
    """
    _check_tiles(min_tiles, max_tiles)
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448) -> tuple[int, int]:
    """The ``(cols, rows)`` grid InternVL cuts a ``width x height`` image into."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: expected positive width and height")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            # A tie goes to the larger grid while the image still fills over half its canvas.
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448,
              use_thumbnail: bool = True) -> int:
    """How many tiles :func:`dynamic_tiles` gives for a ``width x height`` image, thumbnail included."""
    cols, rows = tile_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def dynamic_tiles(image: Image.Image, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448,
                  use_thumbnail: bool = True, resample: int = Image.Resampling.BICUBIC) -> list[Image.Image]:
    """Cut ``image`` into InternVL's tiles: the grid's tiles in row-major order, then the thumbnail."""
    cols, rows = tile_grid(*image.size, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    canvas = image.resize((cols * tile_size, rows * tile_size), resample=resample)
    tiles = [canvas.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), resample=resample))
    return tiles


class Tiler(Protocol):
    """What the data set needs from a tiler: tile counts from the image size alone, and the pixels."""

    tile_size: int

    def num_tiles(self, width: int, height: int, max_tiles: int) -> int: ...

    def __call__(self, image: Image.Image, max_tiles: int) -> torch.Tensor:
        """``(tiles, 3, tile_size, tile_size)`` float32, normalised."""
        ...


class InternVLChatTiler:
    """Tiling + normalisation for OpenGVLab's remote-code InternVL (``InternVLChatModel``).

    Args:
        tile_size: the ViT's input size (``config.vision_config.image_size``, 448).
        min_tiles: the fewest grid tiles (``min_dynamic_patch``, 1).
        use_thumbnail: append the thumbnail (``config.use_thumbnail``, True for InternVL2).
        mean, std: per-channel normalisation (ImageNet's, as InternVL trains with).
    """

    def __init__(self, tile_size: int = 448, *, min_tiles: int = 1, use_thumbnail: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size={tile_size!r}: expected a positive int (448 for InternVL)")
        self.tile_size, self.min_tiles, self.use_thumbnail = tile_size, min_tiles, use_thumbnail
        self._mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def num_tiles(self, width: int, height: int, max_tiles: int) -> int:
        return num_tiles(width, height, min_tiles=self.min_tiles, max_tiles=max_tiles, tile_size=self.tile_size,
                         use_thumbnail=self.use_thumbnail)

    def __call__(self, image: Image.Image, max_tiles: int) -> torch.Tensor:
        tiles = dynamic_tiles(image.convert("RGB"), min_tiles=self.min_tiles, max_tiles=max_tiles,
                              tile_size=self.tile_size, use_thumbnail=self.use_thumbnail)
        arr = np.stack([np.asarray(t, dtype=np.float32).transpose(2, 0, 1) for t in tiles]) / 255.0
        return torch.from_numpy((arr - self._mean) / self._std)

    def __repr__(self) -> str:
        return f"InternVLChatTiler(tile_size={self.tile_size}, min_tiles={self.min_tiles}, use_thumbnail={self.use_thumbnail})"


def internvl_image_processor(tile_size: int = 448, max_tiles: int = 12):
    """A transformers image processor configured like the InternVL ``-hf`` checkpoints' one.

    Use the checkpoint's own (``AutoProcessor.from_pretrained(ckpt).image_processor``) when you
    have it; this builds the same thing in code (no download): crop_to_patches, 448px tiles,
    ImageNet normalisation. The PIL backend is used because it needs no torchvision.
    """
    try:  # transformers >= 5: the PIL backend
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the "slow" processor is the PIL/numpy one
        from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor as Processor

    return Processor(crop_to_patches=True, min_patches=1, max_patches=max_tiles,
                                    size={"height": tile_size, "width": tile_size},
                                    image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


class HFTiler:
    """Tiling through a transformers image processor that tiles (``crop_to_patches``).

    Args:
        image_processor: a ``GotOcr2ImageProcessor``/``GotOcr2ImageProcessorPil`` (the image side
            of ``InternVLProcessor``), e.g. ``processor.image_processor``; None builds
            :func:`internvl_image_processor`.
    """

    def __init__(self, image_processor=None):
        if image_processor is None:
            image_processor = internvl_image_processor()
        missing = [a for a in ("crop_image_to_patches", "get_number_of_image_patches") if not hasattr(image_processor, a)]
        if missing:
            raise TypeError(f"image_processor={type(image_processor).__name__} has no {missing}: expected a transformers "
                            "image processor that tiles (GotOcr2ImageProcessor, the one InternVLProcessor uses)")
        size = image_processor.size
        height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        if height != width:
            raise ValueError(f"image_processor.size={height}x{width}: InternVL tiles are square")
        self.image_processor, self.tile_size = image_processor, int(height)
        self.min_tiles = int(getattr(image_processor, "min_patches", 1))

    def _kwargs(self, max_tiles: int) -> dict:
        _check_tiles(self.min_tiles, max_tiles)
        return {"crop_to_patches": True, "min_patches": self.min_tiles, "max_patches": max_tiles}

    def num_tiles(self, width: int, height: int, max_tiles: int) -> int:
        return int(self.image_processor.get_number_of_image_patches(height, width, self._kwargs(max_tiles)))

    def __call__(self, image: Image.Image, max_tiles: int) -> torch.Tensor:
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt", **self._kwargs(max_tiles))
        return out["pixel_values"].float()

    def __repr__(self) -> str:
        return f"HFTiler({type(self.image_processor).__name__}, tile_size={self.tile_size}, min_tiles={self.min_tiles})"
