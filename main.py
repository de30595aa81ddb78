"""var_jax entry point.

    python main.py --config=configs/var_small.py                      # train both stages
    python main.py --config=configs/var_small.py --config.transformer.total_steps=100
    python main.py --config=configs/var_small.py --mode=sample --workdir=workdirs/var_small
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, TensorBoard, samples). '
                    'Default: workdirs/<config file name>.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'train: the stages in config.stages; '
                  'sample: images from the trained run (or config.init_from) into workdir/samples.')
flags.mark_flags_as_required(['config'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config = FLAGS.config
    from var_jax import runtime
    runtime.keep_freed_memory_on_cpu()  # before JAX starts its thread pool
    import jax
    # Sampling needs no TensorFlow; training imports it only for the input pipeline (CPU only).
    if config.distributed:
        jax.distributed.initialize()
    workdir = FLAGS.workdir or os.path.join(
        'workdirs', os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS['config'])))[0])
    logging.info('workdir %s, %d devices on %d hosts (%s)', workdir, jax.device_count(), jax.process_count(),
                 jax.default_backend())
    if FLAGS.mode == 'train':
        from var_jax import train
        train.run(config, workdir)
    else:
        from var_jax import generate
        generate.run(config, workdir)


if __name__ == '__main__':
    app.run(main)
