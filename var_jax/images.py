"""PNG image grids (what users look at during and after training and sampling)."""

import math
from typing import Optional

import numpy as np

from var_jax.fileio import atomic_write

MIN_TILE = 128  # px: small samples (32-px models) are enlarged to at least this for viewing
BACKGROUND = 1.0  # white gutters between tiles
PADDING_FILL, PADDING_LINE = 0.5, 0.25  # empty cells: mid-grey with a darker X


def tile_upscale(height: int, width: int, min_tile: int = MIN_TILE) -> int:
    """The integer factor that makes the longer side of an (height, width) tile at least min_tile px."""
    return max(1, math.ceil(min_tile / max(height, width, 1)))


def padding_tile(height: int, width: int, channels: int = 3) -> np.ndarray:
    """The mark of an empty cell: mid-grey with both diagonals drawn darker (float32 in [0, 1]).

    Distinct from the white background and from a flat grey sample, so a reader sees that the
    last row was padded rather than that the model drew a blank.
    """
    t = np.full((height, width, channels), PADDING_FILL, np.float32)
    yy, xx = np.mgrid[:height, :width]
    u, v, side = (yy + 0.5) / height, (xx + 0.5) / width, min(height, width)
    half = max(1.0, side / 32)  # line half-width in px
    on = (np.abs(u - v) * side <= half) | (np.abs(u + v - 1) * side <= half)
    t[on] = PADDING_LINE
    return t


def image_grid(
    images, ncols: int = 8, pad: int = 2, upscale: Optional[int] = None, min_tile: int = MIN_TILE
) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> one uint8 grid, `ncols` tiles wide, `pad`-px white gutters.

    Tiles are enlarged by an integer factor, nearest neighbour (each pixel becomes an s x s block,
    so nothing is smoothed away): `upscale`, or by default the smallest s with max(H, W) * s >=
    min_tile (32-px samples -> 128-px tiles; 256-px ones stay as they are). When N does not fill
    the last row, its empty cells are drawn as `padding_tile` (mid-grey with a darker X).
    """
    images = np.clip(np.asarray(images, np.float32), 0, 1)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f'images must be a non-empty (N, H, W, C) array, got shape {images.shape}')
    s = tile_upscale(*images.shape[1:3], min_tile) if upscale is None else int(upscale)
    if s < 1:
        raise ValueError(f'upscale must be an int >= 1 (or None = automatic), got {upscale!r}')
    if s > 1:
        images = images.repeat(s, axis=1).repeat(s, axis=2)
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), BACKGROUND, np.float32)
    empty = padding_tile(h, w, c)
    for i in range(nrows * ncols):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[i] if i < n else empty
    # x255 then truncation, as the official demo converts samples to uint8.
    return (grid * 255).astype(np.uint8)


def save_png(path: str, images, ncols: int = 8, upscale: Optional[int] = None) -> str:
    """Writes `image_grid(images, ncols, upscale=upscale)` as a PNG, atomically; returns the path."""
    from PIL import Image

    grid = image_grid(images, ncols, upscale=upscale)
    with atomic_write(path) as tmp:
        Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(tmp)
    return path
