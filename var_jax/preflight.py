"""Checks everything a run's settings can tell before anything is compiled, read or written.

A bad setting found after a minute of compiling (or at the end of training, losing the work) is the
worst kind of error; `check` finds them all at start-up and raises one ConfigError that lists each
field with what it must hold. main.py calls it for every mode; library users can too.
"""

import numbers
import os

import jax

from var_jax import checkpoint, sample_batches, sampling
from var_jax.errors import ConfigError, UserError
from var_jax.models import inception
from var_jax.models.quantizer import matmul_precision
from var_jax.models.vqvae import decode_dtype
from var_jax.trainers import STAGES, stages_of

MODES = ('train', 'sample', 'eval')


def _int(value, low):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def check(config, mode: str, workdir: str) -> None:
    """Raises ConfigError naming every setting of `config` that cannot work for `mode` in `workdir`."""
    problems = []
    need = lambda ok, msg: ok or problems.append(msg)
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if mode == 'train':
        stages = stages_of(config)
        need(
            stages and set(stages) <= set(STAGES),
            f'stages={config.stages!r}: use "tokenizer", "transformer" or "tokenizer,transformer"',
        )
        for stage in set(stages) & set(STAGES):
            cfg = config[stage]
            need(_int(cfg.total_steps, 1), f'{stage}.total_steps={cfg.total_steps!r} must be an int >= 1')
            if not _int(cfg.batch_size, 1):
                problems.append(f'{stage}.batch_size={cfg.batch_size!r} must be an int >= 1')
            else:
                need(
                    cfg.batch_size % n_dev == 0,
                    f'{stage}.batch_size={cfg.batch_size} is not divisible by the {n_dev} devices (the batch is '
                    f'split over all of them); use a multiple of {n_dev}, '
                    f'e.g. {max(n_dev, cfg.batch_size // n_dev * n_dev)}',
                )
        if 'transformer' in stages:
            ga, batch = config.transformer.grad_accum, config.transformer.batch_size
            need(
                _int(ga, 1) and _int(batch, 1) and batch % (ga * n_dev) == 0,
                f'transformer.grad_accum={ga!r} must be an int >= 1 with transformer.batch_size={batch!r} divisible '
                f'by grad_accum x the {n_dev} devices (every micro-batch is split over all of them)',
            )
        for field in ('log_every', 'save_every', 'sample_every', 'keep_checkpoints'):
            need(_int(config[field], 1), f'{field}={config[field]!r} must be an int >= 1')
        for name, value in (
            ('eval_every', config.eval_every),
            ('eval.val_batches', config.eval.val_batches),
            ('eval.train_num_images', config.eval.train_num_images),
        ):
            need(_int(value, 0), f'{name}={value!r} must be an int >= 0 (0: off)')
        need(
            _int(config.mesh.fsdp, 1) and n_dev % config.mesh.fsdp == 0,
            f'mesh.fsdp={config.mesh.fsdp!r} must divide the number of devices ({n_dev})',
        )
        tok = config.tokenizer
        if 'tokenizer' in stages and tok.perceptual_weight > 0:
            need(
                os.path.isfile(tok.perceptual_weights_path),
                f'tokenizer.perceptual_weight={tok.perceptual_weight} needs tokenizer.perceptual_weights_path, an '
                f'existing .npz (got {tok.perceptual_weights_path!r}); see docs/training.md',
            )
    if mode in ('train', 'eval'):
        from var_jax import data  # validate_config does not load TensorFlow

        try:
            data.validate_config(config.data)
        except ValueError as e:
            problems.append(str(e))
        R = config.vae.patch_nums[-1] * 2 ** (len(config.vae.ch_mult) - 1)
        need(
            config.data.image_size == R,
            f'data.image_size={config.data.image_size} but the tokenizer maps {R} px images to its last scale '
            f'{config.vae.patch_nums[-1]}; set data.image_size={R} or change vae.patch_nums / vae.ch_mult',
        )
        need(
            mode != 'train' or not config.data.pretokenize or config.vae.vocab_size <= 1 << 16,
            f'data.pretokenize stores token ids as uint16, but vae.vocab_size={config.vae.vocab_size} > '
            f'65536; set data.pretokenize=False',
        )
    for field in ('encode_precision', 'decode_precision'):
        try:
            matmul_precision(config.vae[field], f'vae.{field}')
        except ValueError as e:
            problems.append(str(e))
    try:
        decode_dtype(config.vae.decode_dtype, 'vae.decode_dtype')
    except ValueError as e:
        problems.append(str(e))
    if config.var.embed_dim % config.var.num_heads:
        problems.append(
            f'var.embed_dim={config.var.embed_dim} is not divisible by var.num_heads={config.var.num_heads}'
        )
    problems += _sample_problems(config.sample, config.vae.vocab_size, _num_classes(config, mode, problems))
    if mode == 'train' and config.data.source == 'folder' and not problems:
        problems += _folder_problems(config, stages_of(config), n_proc)
    if mode == 'eval':
        from var_jax import evaluation

        e, path = config.eval, config.eval.inception_path
        need(e.what in ('samples', 'tokenizer'), f"eval.what={e.what!r}: use 'samples' or 'tokenizer'")
        if e.what == 'samples':
            try:
                evaluation.check_settings(config)
            except ConfigError as err:
                problems.append(str(err))
            need(
                path and os.path.isfile(path),
                f'--mode=eval scores samples with the FID Inception: eval.inception_path={path!r} '
                f'{"does not exist" if path else "is not set"}. {inception.WHERE_TO_GET}',
            )
        elif e.what == 'tokenizer':
            need(
                _int(e.num_images, 1) and _int(e.batch_size, 1) and e.batch_size % n_dev == 0,
                f'eval.num_images={e.num_images!r} and eval.batch_size={e.batch_size!r} must be ints >= 1, the batch '
                f'a multiple of the {n_dev} devices',
            )
            need(
                not path or os.path.isfile(path),
                f'eval.inception_path={path!r} does not exist (the rFID needs it; leave it empty for no rFID). '
                f'{inception.WHERE_TO_GET}',
            )
    if config.init_from:
        try:
            checkpoint.load_model_config(config.init_from)
        except (OSError, ValueError) as e:
            problems.append(f'init_from: {e}')
    problems += _workdir_problems(workdir, n_proc)
    if problems:
        raise ConfigError('the settings cannot work:\n  - ' + '\n  - '.join(problems))


def _num_classes(config, mode: str, problems: list) -> int:
    """The classes of the model a training run will sample its grids from: var.num_classes, or with 0 the dataset's.
    Elsewhere (sampling a trained run, or weights from init_from) the loaded model decides, before compiling."""
    if mode != 'train' or config.init_from or problems or 'transformer' not in stages_of(config):
        return 1 << 30
    if config.var.num_classes > 0:
        return config.var.num_classes
    from var_jax import data

    try:
        return data.num_classes(config.data)
    except UserError as e:
        problems.append(str(e))
        return 1 << 30


def _folder_problems(config, stages, n_proc: int) -> list:
    """An image folder's readable images (indexed once per run: each file decoded, unreadable ones skipped with
    one warning naming them) must fill one per-host batch of every stage."""
    from var_jax import data

    try:
        shard = data.sources.shard(data.validate_config(config.data), True, jax.process_index(), n_proc)
    except UserError as e:
        return [str(e)]
    return [
        f'{stage}.batch_size={config[stage].batch_size}: the image folder {config.data.folder!r} has '
        f'{shard.num_examples} readable training images per host, fewer than one per-host batch of '
        f'{config[stage].batch_size // n_proc}; add images or lower {stage}.batch_size'
        for stage in stages
        if stage in STAGES and shard.num_examples < config[stage].batch_size // n_proc
    ]


def _sample_problems(s, vocab_size: int, num_classes: int) -> list:
    """config.sample: used by --mode=sample / eval and by the sample grids during training."""
    problems = []
    for field in ('num_images', 'batch_size', 'ncols'):
        if not _int(s[field], 1):
            problems.append(f'sample.{field}={s[field]!r} must be an int >= 1')
    try:
        sampling.check_settings(
            cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, temperature=s.temperature, vocab_size=vocab_size
        )
    except ValueError as e:
        problems.append(f'sample.{e}')
    try:
        sample_batches.parse_labels(s.labels, 1, num_classes)
    except ValueError as e:
        problems.append(str(e))
    return problems


def _workdir_problems(workdir: str, n_proc: int) -> list:
    """The workdir must be a directory this process can create and write (checked by writing a probe file)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        return [f'--workdir={workdir} is a file; give a directory (it is created if missing)']
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        return [f'--workdir={workdir} is not writable ({e.strerror}); give a directory you can write']
    return []
