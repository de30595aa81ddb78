"""The project's offline default dataset: class-conditional synthetic shapes, as local TFDS.

Training and the tests must work on a machine without internet and without a prepared real
dataset, so the project generates its own small image-classification dataset. Each class is a
pattern a person recognises at a glance (circle, square, stripes, ...); position, size, period,
colours and pixel noise are jittered inside a class so that a model has to learn the shape and
not memorise a few images. Colours are random per image, so the class is carried by the shape.

The images are written as a regular TFDS dataset (`var_synthetic_shapes`) into `data_dir`, so they
go through exactly the same tf.data pipeline as cifar10 or imagenet2012. Everything is a pure
function of the seed: two builds with the same seed write identical images and labels.

Drawing is vectorised numpy over all images of one class at once; building the default 10k + 1k
images takes a few seconds on two cores.
"""

import dataclasses
import io
import logging

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from var_jax.errors import ConfigError

RESOLUTION = 32
CLASS_NAMES = (
    'circle',
    'square',
    'triangle',
    'stripes_horizontal',
    'stripes_vertical',
    'checkerboard',
    'ring',
    'cross',
    'gradient',
    'dots',
)
NUM_CLASSES = len(CLASS_NAMES)
DATASET_NAME = 'var_synthetic_shapes'


def _uniform(rng, low, high, n):
    """(n, 1, 1) parameters so they broadcast against the (R, R) pixel grid."""
    return rng.uniform(low, high, size=(n, 1, 1))


def _class_masks(class_id: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Foreground weight in [0, 1] of shape (n, R, R) for n images of one class."""
    r = RESOLUTION
    y, x = np.mgrid[0:r, 0:r].astype(np.float64) + 0.5
    name = CLASS_NAMES[class_id]
    if name in ('circle', 'ring'):
        radius = _uniform(rng, 6.0, 12.0, n)
        cy, cx = (r / 2 + _uniform(rng, -1, 1, n) * (r / 2 - radius - 1) for _ in range(2))
        dist = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        if name == 'circle':
            return dist <= radius
        return (dist <= radius) & (dist >= radius - _uniform(rng, 2.0, 3.5, n))
    if name in ('square', 'cross', 'triangle'):
        half = _uniform(rng, 6.0, 11.0, n)
        cy, cx = (r / 2 + _uniform(rng, -1, 1, n) * (r / 2 - half - 1) for _ in range(2))
        dy, dx = y - cy, x - cx
        if name == 'square':
            return (np.abs(dy) <= half) & (np.abs(dx) <= half)
        if name == 'cross':
            arm = _uniform(rng, 1.5, 3.0, n)
            inside = (np.abs(dy) <= half) & (np.abs(dx) <= half)
            return inside & ((np.abs(dy) <= arm) | (np.abs(dx) <= arm))
        # Upright triangle: apex at the top, base at the bottom of the bounding square.
        return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    if name in ('stripes_horizontal', 'stripes_vertical'):
        width = rng.integers(2, 5, size=(n, 1, 1))  # stripe width in pixels
        coord = (y if name == 'stripes_horizontal' else x) + rng.integers(0, 8, size=(n, 1, 1))
        return (coord // width) % 2 == 0
    if name == 'checkerboard':
        cell = rng.integers(3, 7, size=(n, 1, 1))
        oy, ox = rng.integers(0, 8, size=(2, n, 1, 1))
        return ((y + oy) // cell + (x + ox) // cell) % 2 == 0
    if name == 'gradient':
        angle = _uniform(rng, 0, 2 * np.pi, n)
        ramp = ((x - r / 2) * np.cos(angle) + (y - r / 2) * np.sin(angle)) / r + 0.5
        return np.clip(ramp, 0.0, 1.0)
    if name == 'dots':
        period = rng.integers(6, 9, size=(n, 1, 1))
        dot_radius = _uniform(rng, 1.3, 2.0, n)
        oy, ox = rng.integers(0, 8, size=(2, n, 1, 1))
        py = (y + oy) % period - period / 2
        px = (x + ox) % period - period / 2
        return py**2 + px**2 <= dot_radius**2
    raise ValueError(f'unknown class id {class_id}')


def generate_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draws one uint8 (R, R, 3) image per label.

    Background and foreground colours are random, with every channel of the foreground at a
    circular distance of 80..176 from the background, so the shape always stands out.
    """
    labels = np.asarray(labels)
    n = len(labels)
    mask = np.zeros((n, RESOLUTION, RESOLUTION), np.float32)
    for class_id in range(NUM_CLASSES):
        (idx,) = np.nonzero(labels == class_id)
        if len(idx):
            mask[idx] = _class_masks(class_id, len(idx), rng)
    background = rng.uniform(0, 256, size=(n, 1, 1, 3)).astype(np.float32)
    foreground = (background + rng.uniform(80, 176, size=(n, 1, 1, 3)).astype(np.float32)) % 256
    # float32 throughout: this is the bulk of the generation time.
    image = rng.standard_normal(size=mask.shape + (3,), dtype=np.float32)
    image *= 6.0  # pixel noise
    image += background
    image += (foreground - background) * mask[..., None]
    np.clip(image, 0, 255, out=image)
    return np.rint(image, out=image).astype(np.uint8)


def generate_split(seed: int, split_id: int, num_examples: int):
    """Balanced, shuffled labels and their images; a pure function of (seed, split_id)."""
    rng = np.random.default_rng([seed, split_id])
    labels = rng.permutation(np.arange(num_examples) % NUM_CLASSES).astype(np.int64)
    return generate_images(labels, rng), labels


@dataclasses.dataclass(eq=False)
class VarSyntheticShapesConfig(tfds.core.BuilderConfig):
    """Seed and split sizes; the config name encodes them, so settings never share files."""

    seed: int = 0
    train_size: int = 10000
    test_size: int = 1000


def make_config(seed: int = 0, train_size: int = 10000, test_size: int = 1000):
    for value, what in ((seed, 'seed'), (train_size, 'train_size'), (test_size, 'test_size')):
        if int(value) < 0:
            raise ConfigError(f'synthetic dataset {what} must be >= 0, got {value}')
    return VarSyntheticShapesConfig(
        name=f'seed{seed}_train{train_size}_test{test_size}',
        seed=int(seed),
        train_size=int(train_size),
        test_size=int(test_size),
        description='Synthetic class-conditional shapes generated by var_jax.',
    )


class VarSyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Local TFDS builder: generates the images in `_generate_examples`, downloads nothing."""

    VERSION = tfds.core.Version('1.0.0')
    # TFDS looks next to the builder's source for a download-checksums file; there are no
    # downloads, and the lookup needs the `importlib_resources` backport that TFDS 4.9 does not
    # declare on Python >= 3.9. None skips it.
    code_path = None
    BUILDER_CONFIGS = [make_config()]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(RESOLUTION, RESOLUTION, 3)),
                    'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=('image', 'label'),
            description=__doc__.split('\n')[0],
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        cfg = self.builder_config
        return {
            'train': self._generate_examples(cfg.seed, 0, cfg.train_size),
            'test': self._generate_examples(cfg.seed, 1, cfg.test_size),
        }

    def _generate_examples(self, seed, split_id, num_examples):
        images, labels = generate_split(seed, split_id, num_examples)
        for i in range(num_examples):
            # PIL is much faster than TFDS's per-example TF encoder; noise defeats compression.
            png = io.BytesIO()
            PIL.Image.fromarray(images[i]).save(png, format='PNG', compress_level=0)
            yield i, {'image': png.getvalue(), 'label': int(labels[i])}


def get_builder(data_dir=None, seed: int = 0, train_size: int = 10000, test_size: int = 1000):
    """Returns the prepared builder, generating the dataset into `data_dir` on first use.

    `data_dir=None` is TFDS's default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). Hosts that
    share a data_dir on a network file system should build it once before a multi-host run; TFDS
    writes into a temporary folder and renames it, so a concurrent build does not corrupt it.
    """
    config = make_config(seed, train_size, test_size)
    if config.name in VarSyntheticShapes.builder_configs:
        config = config.name  # TFDS refuses a custom config named like a predefined one.
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # TFDS warns at every start that the config is a custom one
    try:
        builder = VarSyntheticShapes(config=config, data_dir=data_dir)
        if not builder.is_prepared():
            print(
                f'building the offline dataset {DATASET_NAME} ({train_size} + {test_size} images) in '
                f'{builder.data_dir} (first use only) ...',
                flush=True,
            )
            tfds.disable_progress_bar()  # one line instead of a dozen progress bars in a log
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        absl_logger.setLevel(level)
    return builder
