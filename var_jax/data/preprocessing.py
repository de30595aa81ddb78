"""Decoding and the official VAR transform (utils/data.py), as tf.data functions.

train = resize the short side to round(resize_ratio * R) with Lanczos, random RxR crop, optional
horizontal flip (off by default, as in VAR), scale to [-1, 1]; eval = the same resize and a center
crop. Sizes and crop offsets are torchvision's exactly; the Lanczos resize is TF's float one, rounded
to uint8. It is within a level of PIL's on most pixels, but PIL also rounds its intermediate
(horizontal) pass to uint8, so where the filter overshoots (pixel noise, hard edges) single pixels
differ by up to ~25 levels; exact PIL (via tf.numpy_function) would cost input throughput.

Folder images are decoded by PIL like the official loader's `convert('RGB')`, except where that
silently loses the picture: 16-bit greyscale is scaled to 8 bits instead of clipped to white, and
transparent images are composited on a white background instead of losing their alpha.
"""

import numpy as np
import PIL.Image
import tensorflow as tf

# Greyscale modes PIL gives 16-bit files (PNG, TIFF, PGM); 'I' is PIL's 32-bit int mode that holds them.
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')
BACKGROUND = 255  # white: what a page or a browser shows behind transparent pixels


def decode_encoded(encoded):
    """Encoded JPEG/PNG/... bytes -> uint8 (h, w, 3); JPEG with the accurate IDCT, like PIL."""
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """uint8 (h, w, 3) of a PIL image of any mode (see the module docstring for 16 bits and alpha)."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.float64), 0, 65535) * (255 / 65535)
        return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode in ALPHA_MODES or 'transparency' in image.info:  # 'transparency': P, L or RGB with tRNS
        rgba = np.asarray(image.convert('RGBA')).astype(np.float64)
        alpha = rgba[..., 3:] / 255
        return np.rint(rgba[..., :3] * alpha + BACKGROUND * (1 - alpha)).astype(np.uint8)
    return np.asarray(image.convert('RGB'))


def _read_rgb(path) -> np.ndarray:
    with PIL.Image.open(path.decode() if isinstance(path, bytes) else path) as image:
        return pil_to_rgb(image)


def decode_path(path):
    """File path -> uint8 (h, w, 3) via PIL, which handles every mode/format the folder may hold."""
    image = tf.numpy_function(_read_rgb, [path], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


def resize_short_side(image, size: int):
    """torchvision Resize(size), Lanczos: short side -> size, long -> int(size * long / short)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    long_side = size * tf.maximum(h, w) // tf.minimum(h, w)
    new_h = tf.where(h <= w, size, long_side)
    new_w = tf.where(h <= w, long_side, size)
    image = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]), method='lanczos3', antialias=True)
    return tf.round(tf.clip_by_value(image, 0.0, 255.0))  # PIL's resize returns uint8.


def center_crop(image, size: int):
    """torchvision CenterCrop: offset round((h - size) / 2), with round-half-to-even like Python."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top = tf.cast(tf.round(tf.cast(h - size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(w - size, tf.float32) / 2), tf.int32)
    return image[top : top + size, left : left + size]


def to_model_range(image):
    return image * (2.0 / 255.0) - 1.0


def train_preprocess(cfg, epoch_seed: int, decode):
    """(position in the epoch, (key, label)) -> example; the randomness depends on nothing else."""
    size = cfg.image_size
    mid = round(cfg.resize_ratio * size)  # Python round, as the official code.

    def fn(position, key_and_label):
        key, label = key_and_label
        seed = tf.stack([tf.constant(epoch_seed, tf.int64), position])
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = resize_short_side(decode(key), mid)
        image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
        if cfg.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return {'image': to_model_range(image), 'label': label}

    return fn


def eval_preprocess(cfg, decode):
    """(key, label) -> example with the center crop."""

    def fn(key, label):
        image = resize_short_side(decode(key), round(cfg.resize_ratio * cfg.image_size))
        image = center_crop(image, cfg.image_size)
        image.set_shape([cfg.image_size, cfg.image_size, 3])
        return {'image': to_model_range(image), 'label': label}

    return fn
