"""Images of the folder source: modes and formats, 16 bits, transparency, small images, and the
official eval transform (utils/data.py) written with PIL in this file, independently of the code under test.
"""

import warnings

import numpy as np
import PIL.Image
import pytest

from configs.common import base_config
from var_jax import data
from var_jax.data import preprocessing


def folder_config(root, **overrides):
    cfg = base_config().data
    cfg.update(dict(source='folder', folder=str(root)), **overrides)
    return cfg


def eval_images(cfg):
    """Every eval image as uint8-valued float pixels (0..255), with its label."""
    batches = list(data.make_eval_iterator(cfg, 4, process_index=0, process_count=1))
    images = np.concatenate([b['image'][b['mask']] for b in batches])
    labels = np.concatenate([b['label'][b['mask']] for b in batches])
    return (images + 1) * 127.5, labels


def over_white(colour, alpha):
    """Straight alpha over white, rounded: the expected composite, written out."""
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in colour)


# ----------------------------------------------------------------------------- modes and formats


def write_folder(root):
    """Two classes of solid-colour images in various formats, plus one corrupt file."""
    (root / 'apple').mkdir(parents=True)
    (root / 'berry').mkdir()
    PIL.Image.new('RGB', (50, 40), (200, 30, 40)).save(root / 'apple' / 'rgb.jpg', quality=95)
    PIL.Image.new('L', (40, 44), 77).save(root / 'apple' / 'gray.png')
    PIL.Image.new('RGBA', (40, 60), (10, 200, 30, 128)).save(root / 'berry' / 'rgba.png')
    palette = PIL.Image.new('P', (40, 40), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10])
    palette.save(root / 'berry' / 'pal.png')
    PIL.Image.new('RGB', (8, 8), (0, 0, 255)).save(root / 'berry' / 'tiny.PNG')
    (root / 'berry' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff this is not a jpeg')
    (root / 'berry' / 'notes.txt').write_text('not an image, ignored')
    # colour -> label of every readable image
    return {(200, 30, 40): 0, (77, 77, 77): 0, over_white((10, 200, 30), 128): 1, (200, 10, 10): 1, (0, 0, 255): 1}


def test_folder_source_converts_and_skips_corrupt(tmp_path):
    expected = write_folder(tmp_path / 'images')
    cfg = folder_config(tmp_path / 'images', image_size=16)
    assert data.num_classes(cfg) == 2
    with (
        pytest.warns(UserWarning, match=r'Skipped 1 of 6 .*corrupt\.jpg'),
        pytest.warns(UserWarning, match=r'1 of 5 images .*tiny\.PNG'),
    ):
        images, labels = eval_images(cfg)
    assert images.shape == (5, 16, 16, 3)
    found = {}
    for image, label in zip(images, labels):
        colour = tuple(int(v) for v in np.round(image.mean((0, 1))))
        assert image.std((0, 1)).max() < 2  # solid colour survives resize and crop
        found[colour] = int(label)
    # Every image (grayscale, RGBA, palette, tiny upsampled, JPEG) is there with the right label.
    for colour, label in expected.items():
        match = [c for c in found if np.abs(np.subtract(c, colour)).max() <= 3]
        assert len(match) == 1 and found[match[0]] == label, (colour, found)

    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the folder was indexed (and its problems reported) once
        batch = next(data.make_train_iterator(cfg, 2, seed=0, process_index=0, process_count=1))
    assert batch['image'].shape == (2, 16, 16, 3) and batch['label'].dtype == np.int32


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 30000, 32896, 65535] * 3 + [40000]] * 16, np.uint16)  # 16 x 16
    (tmp_path / 'grey').mkdir()
    PIL.Image.fromarray(values).save(tmp_path / 'grey' / 'deep.png')
    with PIL.Image.open(tmp_path / 'grey' / 'deep.png') as image:
        assert image.mode == 'I;16'  # what a 16-bit PNG opens as
    images, _ = eval_images(folder_config(tmp_path, image_size=16, resize_ratio=1.0))
    want = np.round(values / 65535 * 255)  # 30000 -> 117, not 255
    assert want[0, 2] == 117
    np.testing.assert_allclose(images[0], np.repeat(want[..., None], 3, -1), atol=1e-3)
    # PIL's 32-bit 'I' mode holds 16-bit files too (PGM, some TIFFs).
    as_int32 = PIL.Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == 'I'
    np.testing.assert_array_equal(preprocessing.pil_to_rgb(as_int32)[..., 1], want)


def test_transparent_images_are_composited_on_white(tmp_path):
    (tmp_path / 'a').mkdir()
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (200, 40, 0)
    rgba[:, :8, 3] = 64  # left half mostly transparent, right half opaque
    rgba[:, 8:, 3] = 255
    PIL.Image.fromarray(rgba).save(tmp_path / 'a' / 'rgba.png')
    grey_alpha = PIL.Image.fromarray(
        np.stack([np.full((16, 16), 100, np.uint8), np.full((16, 16), 128, np.uint8)], -1), 'LA'
    )
    grey_alpha.save(tmp_path / 'a' / 'la.png')
    palette = PIL.Image.fromarray(np.repeat(np.arange(16, dtype=np.uint8)[None] % 2, 16, 0), 'P')
    palette.putpalette([0, 0, 0, 10, 120, 250])
    palette.save(tmp_path / 'a' / 'p.png', transparency=0)  # index 0 (black) is fully transparent
    images, _ = eval_images(folder_config(tmp_path, image_size=16, resize_ratio=1.0))
    by_first_pixel = {tuple(int(v) for v in image[0, 15]): image for image in np.round(images)}
    rgba_image = by_first_pixel[(200, 40, 0)]
    np.testing.assert_array_equal(rgba_image[:, :8], np.broadcast_to(over_white((200, 40, 0), 64), (16, 8, 3)))
    np.testing.assert_array_equal(by_first_pixel[(10, 120, 250)][:, ::2], 255)  # transparent = white
    assert over_white((100, 100, 100), 128) in by_first_pixel  # LA
    np.testing.assert_array_equal(by_first_pixel[over_white((100,) * 3, 128)], over_white((100,) * 3, 128)[0])


def test_small_images_warn_once_per_run_with_the_count(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    for i, size in enumerate([(20, 5), (12, 30), (1, 1), (16, 16), (40, 17)]):  # R = 16: three are smaller
        PIL.Image.new('RGB', size, (i * 40, 0, 0)).save(tmp_path / 'ab'[i % 2] / f'{i}.png')
    cfg = folder_config(tmp_path, image_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(2):
            next(data.make_train_iterator(cfg, 2, seed=0, process_index=0, process_count=1))
            eval_images(cfg)
    messages = [str(w.message) for w in caught if 'upscaled' in str(w.message)]
    assert len(messages) == 1, messages
    assert messages[0].startswith('3 of 5 images') and 'data.image_size=16' in messages[0]


# ----------------------------------------------------------------------------- the official eval transform


def official_eval_transform(path, size, resize_ratio):
    """utils/data.py: Resize(round(ratio * R), LANCZOS), CenterCrop(R), ToTensor, x * 2 - 1 (torchvision on PIL)."""
    with PIL.Image.open(path) as image:
        image = image.convert('RGB')
    mid = round(resize_ratio * size)
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(mid * long / short)  # torchvision's _compute_resized_output_size
    image = image.resize((mid, new_long) if w <= h else (new_long, mid), PIL.Image.LANCZOS)
    top = int(round((image.height - size) / 2.0))  # torchvision's center_crop
    left = int(round((image.width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return (np.asarray(image, np.float32) / 255) * 2 - 1


def test_eval_center_crop_matches_the_official_transform(tmp_path):
    """Noise images of odd, non-square sizes: a crop one pixel off, or a differently rounded size, fails."""
    rng = np.random.default_rng(0)
    # (w, h) -> resized to 21x18 (left offset 2.5 -> 2), 23x18 (3.5 -> 4), 18x24 (4), 18x25 (4.5 -> 4),
    # and an upscaled 13x11 -> 21x18.
    sizes = [(45, 37), (41, 31), (31, 43), (33, 47), (13, 11)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        (tmp_path / f'c{i}').mkdir()
        paths.append(tmp_path / f'c{i}' / 'noise.png')
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[i])
    cfg = folder_config(tmp_path, image_size=16, resize_ratio=1.125)  # resize to 18, crop 16
    with pytest.warns(UserWarning, match='1 of 5 images'):
        images, labels = eval_images(cfg)
    for image, label in zip(images, labels):
        levels = np.abs(image - (official_eval_transform(paths[label], 16, 1.125) + 1) * 127.5)
        # TF's float Lanczos vs PIL's (uint8 between its two passes, see var_jax/data/preprocessing.py): within
        # a level on most pixels of this noise; one pixel of offset or of size would leave ~1% that close.
        assert levels.mean() < 1 and (levels <= 1 + 1e-3).mean() > 0.9, (sizes[label], levels.mean())
