"""var_jax entry point.

    python main.py --config=configs/var_small.py                      # train both stages
    python main.py --config=configs/var_small.py --config.transformer.total_steps=100
    python main.py --config=configs/var_small.py --mode=sample --workdir=workdirs/var_small
    python main.py --config=configs/var_small.py --mode=eval --workdir=workdirs/var_small \
        --config.eval.inception_path=checkpoints/inception_fid.npz

Exit codes: 0 done; 2 bad settings or input (one message naming the field or file and the fix);
3 stopped on a NaN/Inf loss (the last good checkpoint is kept); 75 preempted by SIGTERM after saving
(resumable: run the same command again); 130 interrupted by Ctrl-C; 1 anything else (with a traceback).
"""

import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ INFO lines (the input pipeline's TF)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
flags.DEFINE_string(
    'workdir', None, 'Run directory (checkpoints, TensorBoard, samples). Default: workdirs/<config file name>.'
)
flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'sample', 'eval'],
    'train: the stages in config.stages; '
    'sample: images from the trained run (or config.init_from) into workdir/samples; '
    'eval: FID / sFID / IS / precision / recall of config.eval.num_images samples into workdir/eval.',
)
flags.mark_flags_as_required(['config'])

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 75, 130


def _fail(code: int, message: str):
    print(f'error: {message}' if code == EXIT_BAD_INPUT else message, file=sys.stderr, flush=True)
    sys.exit(code)


def parse_flags(argv):
    """absl's parsing, with a bad flag, config override or config file reported in one line, not a traceback."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        _fail(EXIT_BAD_INPUT, f'{e}\n(python main.py --helpfull lists the flags)')
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections wraps a mistyped field's KeyError ('name'\nDid you mean "..."?) in an AttributeError.
        reason = str(e.args[0] if e.args else e)
        if m := re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', reason):
            reason = f'no field "{m.group(2)}"; did you mean "{m.group(1)}"?'
        _fail(EXIT_BAD_INPUT, f'a --config.<field> flag is wrong: {reason} (configs/common.py lists every field)')
    path = config_flags.get_config_filename(FLAGS['config'])
    if not os.path.isfile(path):
        _fail(
            EXIT_BAD_INPUT,
            f'--config={path}: no such file (the configs are in configs/, e.g. --config=configs/var_small.py)',
        )
    return rest


def _resume_note(mode: str, workdir: str) -> str:
    """For an error in the middle of training: the checkpoints on disk are complete (fit waits for the save in
    flight) and the same command resumes from the newest."""
    import glob

    saved = [p for p in glob.glob(os.path.join(workdir, '*', 'checkpoints', '*')) if os.path.basename(p).isdigit()]
    if mode != 'train' or not saved:
        return ''
    return f'\n{workdir} keeps its complete checkpoints: fix the above and run the same command again to resume'


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not FLAGS['verbosity'].present:  # library INFO lines (orbax, the backends) only when asked: -v 0
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    from var_jax import runtime

    runtime.keep_freed_memory_on_cpu()  # before JAX starts its thread pool
    import jax

    from var_jax import preflight
    from var_jax.errors import UserError
    from var_jax.trainers import loop

    try:
        runtime.initialize_distributed(config)
    except UserError as e:
        _fail(EXIT_BAD_INPUT, str(e))
    if jax.process_index() > 0:  # one progress line: process 0's; the others' warnings and errors still show
        sys.stdout = open(os.devnull, 'w')
    runtime.use_compile_cache(config.compile_cache_dir)
    workdir = FLAGS.workdir or os.path.join(
        'workdirs', os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS['config'])))[0]
    )
    try:
        if config.init_from.startswith('hf:'):  # official weights by name: fetched and converted once (var_jax.hub)
            from var_jax import hub

            try:
                config.init_from = hub.resolve_init_from(config.init_from)
            except (ValueError, ImportError) as e:
                _fail(EXIT_BAD_INPUT, f'init_from: {e}')
        preflight.check(config, FLAGS.mode, workdir)
        print(
            f'{FLAGS.mode}: workdir {workdir}, {jax.device_count()} {jax.default_backend()} devices on '
            f'{jax.process_count()} hosts',
            flush=True,
        )
        if FLAGS.mode == 'train':
            from var_jax import data, trainers

            data.hide_accelerators_from_tensorflow()  # JAX owns the GPUs/TPUs; tf.data only reads on the CPU
            trainers.run(config, workdir)
        elif FLAGS.mode == 'eval':
            from var_jax import data, evaluation

            data.hide_accelerators_from_tensorflow()  # TFDS references and TensorBoard use TF, on the CPU only
            evaluation.run(config, workdir)
        else:
            from var_jax import generate

            generate.run(config, workdir)
    except UserError as e:  # var_jax/errors.py: everything a user can fix
        _fail(EXIT_BAD_INPUT, str(e) + _resume_note(FLAGS.mode, workdir))
    except loop.NonFiniteError as e:
        _fail(EXIT_NONFINITE, str(e))
    except loop.Preempted as e:
        _fail(EXIT_PREEMPTED, str(e))
    except KeyboardInterrupt:
        # A checkpoint being written is unfinished; the next start discards it and resumes from the newest
        # complete one. Exit at once, without waiting for (or tracebacks from) the writer threads.
        print(
            f'\ninterrupted: {workdir} keeps its newest complete checkpoint; run the same command again to resume',
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_INTERRUPTED)


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
