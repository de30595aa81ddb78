"""Sample grids: tiles enlarged for viewing (nearest neighbour), empty cells marked, PNG written."""

import numpy as np
import pytest

from var_jax import images


def _cells(grid, n_rows, n_cols, tile, pad=2):
    """The (row, col) tiles of a grid, cut at the documented layout."""
    return {
        (r, c): grid[
            pad + r * (tile + pad) : pad + r * (tile + pad) + tile,
            pad + c * (tile + pad) : pad + c * (tile + pad) + tile,
        ]
        for r in range(n_rows)
        for c in range(n_cols)
    }


def test_small_tiles_are_enlarged_by_an_integer_nearest_neighbour_factor():
    imgs = np.random.default_rng(0).random((7, 32, 32, 3)).astype(np.float32)
    grid = images.image_grid(imgs, ncols=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 + 3 * 130, 2 + 3 * 130, 3)  # 128-px tiles, 2-px gutters
    cells = _cells(grid, 3, 3, 128)
    want = (imgs[4] * 255).astype(np.uint8)
    np.testing.assert_array_equal(cells[1, 1], np.kron(want, np.ones((4, 4, 1), np.uint8)))  # 4x4 pixel blocks
    assert images.image_grid(np.zeros((2, 256, 256, 3)), ncols=2).shape == (260, 518, 3)  # big tiles: as they are
    assert images.image_grid(np.zeros((2, 48, 48, 3)), ncols=2).shape == (2 + 146, 2 + 2 * 146, 3)  # 3x: 144 px
    assert images.image_grid(imgs, ncols=7, upscale=1).shape == (36, 2 + 7 * 34, 3)


def test_padding_cells_are_marked_and_differ_from_background_and_flat_grey():
    imgs = np.full((7, 32, 32, 3), 0.5, np.float32)  # a flat grey sample must not look like an empty cell
    grid = images.image_grid(imgs, ncols=3)
    cells = _cells(grid, 3, 3, 128)
    sample, empty = cells[2, 0], cells[2, 1]
    np.testing.assert_array_equal(empty, cells[2, 2])
    assert not np.array_equal(empty, sample)
    assert (empty != 255).any(axis=-1).mean() > 0.99  # no cell is left at the white background
    levels = set(np.unique(empty))
    assert levels == {int(images.PADDING_FILL * 255), int(images.PADDING_LINE * 255)}
    line = empty[..., 0] == int(images.PADDING_LINE * 255)
    assert line[np.arange(128), np.arange(128)].all() and line[np.arange(128), 127 - np.arange(128)].all()  # an X
    assert 0.03 < line.mean() < 0.2


def test_save_png_writes_the_grid(tmp_path):
    from PIL import Image

    imgs = np.random.default_rng(1).random((5, 32, 32, 3)).astype(np.float32)
    path = images.save_png(str(tmp_path / 'sub' / 'grid.png'), imgs, ncols=4)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), images.image_grid(imgs, ncols=4))
    assert [p.name for p in (tmp_path / 'sub').iterdir()] == ['grid.png']  # no temporary file left behind
    with pytest.raises(ValueError, match='upscale'):
        images.image_grid(imgs, upscale=0)
