"""PNG image grids (what users look at during and after training and sampling)."""
import os

import numpy as np


def image_grid(images, ncols: int = 8, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> one uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) grid."""
    images = np.clip(np.asarray(images, np.float32), 0, 1)
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    # x255 then truncation, as the official demo converts samples to uint8.
    return (grid * 255).astype(np.uint8)


def save_png(path: str, images, ncols: int = 8, upscale: int = 1) -> str:
    """Writes an image grid as PNG atomically (tmp file + rename); returns the path."""
    from PIL import Image
    grid = image_grid(images, ncols)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp.png'
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    return path
