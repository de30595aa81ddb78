"""What both training stages share: the train state, the NaN guard, models from the config, and `fit`.

A stage is a pure, jitted step `(state, *frozen, batch[, token_weights]) -> (state, metrics)` over one
mesh with explicit shardings (params replicated or FSDP-split, batch split over all devices, state
donated). `fit` drives it: resume, checkpoints, preemption, the progress line, TensorBoard, sample grids.
"""

import contextlib
import dataclasses
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax import api, checkpoint, sharding
from var_jax.errors import MissingFileError

# Config fields a run may change when it resumes: schedule length and bookkeeping, never the model or data.
RESUMABLE_KEYS = (
    '*total_steps',
    '*log_every*',
    '*eval_every*',
    '*sample_every*',
    '*save_every*',
    '*keep_checkpoints*',
    'sample',
    'sample.*',
    'mesh',
    'mesh.*',
    'distributed',
    'cluster',
    'cluster.*',
    'stages',
    '*perceptual_weights_path',
    'eval',
    'eval.*',
    'compile_cache_dir',
)
# Config sections a stage's checkpoints do not depend on: the other stage's own settings (so the
# transformer can be retuned on a finished tokenizer, and the reverse, in the same workdir).
# data.pretokenize* only changes how the transformer reads its data.
OTHER_STAGE_KEYS = {'tokenizer': ('transformer', 'var', 'data.pretokenize*'), 'transformer': ('tokenizer',)}


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the offending update was not applied."""


class Preempted(Exception):
    """SIGTERM (a preemption notice) stopped the run after saving a checkpoint: resumable, not a failure."""


# --- the train state ---------------------------------------------------------------------------
def new_state(params, tx, seed: int):
    """The checkpointed train state: params, optimizer state, step, rng and the NaN flag."""
    return dict(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
        nonfinite=jnp.zeros((), bool),
    )


def apply_update(state, grads, tx, loss, grad_norm):
    """AdamW update, skipped (state kept, flag raised) when the loss or gradients are not finite."""
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return dict(
        state,
        params=keep(params, state['params']),
        opt_state=keep(opt_state, state['opt_state']),
        step=state['step'] + 1,
        nonfinite=state['nonfinite'] | ~finite,
    )


def init_state(mesh, tx, seed: int, init_fn=None, params=None, extra=None):
    """(state, shardings): a train state created already sharded, from init_fn(key) or around given params.

    extra: additional state entries (e.g. the tokenizer's code hit counts).
    """
    extra = extra or {}
    if params is None:
        return sharding.init_sharded(
            lambda key: new_state(init_fn(key), tx, seed) | extra, mesh, jax.random.PRNGKey(seed)
        )
    make = lambda p: new_state(p, tx, seed) | extra
    shardings = sharding.param_sharding(mesh, jax.eval_shape(make, params))
    params = jax.device_put(params, shardings['params'])
    return jax.jit(make, out_shardings=shardings)(params), shardings


# --- models and weights from the config --------------------------------------------------------
def models_from_config(config, num_data_classes: int = 0):
    """(VQVAE, VAR) from config.vae / config.var; the VAR takes vocabulary/Cvae/scales from the VQVAE.

    var.num_classes <= 0 means the dataset's number of classes (`num_data_classes`).
    """
    var_kwargs = config.var.to_dict()
    R = config.vae.patch_nums[-1] * 2 ** (len(config.vae.ch_mult) - 1)
    if config.data.image_size != R:
        raise ValueError(
            f'data.image_size={config.data.image_size} but the tokenizer maps {R} px images to its '
            f'last scale {config.vae.patch_nums[-1]}; set data.image_size={R} or change '
            f'vae.patch_nums / vae.ch_mult'
        )
    if var_kwargs['num_classes'] <= 0:
        var_kwargs['num_classes'] = num_data_classes
    return api.build_models(config.vae, var_kwargs)


def load_init_from(config):
    """The converted / exported checkpoint named by config.init_from: (model cfgs, params) or None."""
    if not config.init_from:
        return None
    if not os.path.isdir(config.init_from):
        raise MissingFileError(
            f'init_from={config.init_from!r} does not exist; point it at a directory '
            f"written by python -m var_jax.convert or at a finished run's export/"
        )
    return checkpoint.load_pretrained(config.init_from)


# --- the loop ----------------------------------------------------------------------------------
def _log_line(stage, step, total, metrics, img_per_s, eta_s):
    keys = [
        k
        for k in (
            'loss',
            'Lm',
            'Lt',
            'Accm',
            'Acct',
            'rec_l1',
            'perceptual',
            'vq',
            'g_loss',
            'd_loss',
            'grad_norm',
            'lr',
        )
        if k in metrics
    ]
    vals = ' '.join(f'{k} {metrics[k]:.4g}' for k in keys)
    return f'[{stage}] step {step}/{total} {vals} | {img_per_s:.1f} img/s | ETA {eta_s / 60:.1f} min'


@dataclasses.dataclass(frozen=True)
class Stage:
    """What `fit` trains: `step_fn(state, *step_args, batch[, token_weights]) -> (state, metrics)` for total_steps
    steps of batch_size images (global). Batches come from make_batches(start_step), an iterator of this host's
    batches (dicts of arrays split over the devices along their first axis) from the step the run resumes at; by
    default the training images of config.data (`data.make_train_iterator`). token_weights_fn(step): the loss
    weights passed to the step (progressive training). on_sample(params, step) every config.sample_every steps and
    at the end; on_eval(params, step) -> {name: value} every config.eval_every steps (0: never) and at the end."""

    name: str
    step_fn: Callable
    total_steps: int
    batch_size: int
    step_args: tuple = ()
    on_sample: Optional[Callable] = None
    on_eval: Optional[Callable] = None
    token_weights_fn: Optional[Callable] = None
    make_batches: Optional[Callable] = None


def fit(spec: Stage, workdir: str, config, *, state, state_shardings, mesh):
    """Trains `spec` from workdir/<spec.name>'s latest checkpoint (or `state`, laid out as `state_shardings` on
    `mesh`) to spec.total_steps; returns the final state.

    Saves every config.save_every steps, at the end and on SIGTERM (then raises Preempted); writes TensorBoard
    scalars and one progress line per config.log_every steps; stops with NonFiniteError on a NaN/Inf; on every
    exit the save in flight finishes first.
    """
    stage, step_fn, step_args, total_steps, batch_size = (
        spec.name,
        spec.step_fn,
        spec.step_args,
        spec.total_steps,
        spec.batch_size,
    )
    on_sample, on_eval, token_weights_fn, make_batches = (
        spec.on_sample,
        spec.on_eval,
        spec.token_weights_fn,
        spec.make_batches,
    )
    from flax.metrics import tensorboard

    from var_jax import data  # TensorFlow is only needed for the input pipeline

    stage_dir = os.path.join(workdir, stage)
    ckpt = checkpoint.Checkpointer(
        stage_dir,
        max_to_keep=config.keep_checkpoints,
        save_every=config.save_every,
        config=config,
        resumable_keys=RESUMABLE_KEYS + OTHER_STAGE_KEYS.get(stage, ()),
    )
    writer = None
    try:
        restored, start = ckpt.restore_latest(sharding.with_shardings(state, state_shardings))
        if restored is not None:
            state = restored
            print(f'[{stage}] resumed from step {start} of {stage_dir}', flush=True)
        if start >= total_steps:
            return state
        if make_batches is None:
            make_batches = lambda step: data.make_train_iterator(
                config.data, batch_size, seed=config.seed, start_step=step
            )
        batches = make_batches(start)
        writer = tensorboard.SummaryWriter(os.path.join(stage_dir, 'tb')) if jax.process_index() == 0 else None
        batch_sharding = sharding.batch_sharding(mesh)  # one sharding for every array of the batch
        extra = (sharding.replicated(mesh),) if token_weights_fn else ()
        jitted = jax.jit(
            step_fn,
            in_shardings=(state_shardings, *[sharding.replicated(mesh)] * len(step_args), batch_sharding, *extra),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        t0 = time.time()
        pending, previous = [], None
        print(f'[{stage}] step {start}/{total_steps}: compiling the train step ...', flush=True)
        # On TPU the VAR's splash attention runs per device under the mesh (shard_map); elsewhere nothing needs it.
        in_mesh = jax.set_mesh(mesh) if jax.default_backend() == 'tpu' else contextlib.nullcontext()
        with ckpt.handle_preemption(), in_mesh:
            for step in range(start, total_steps):
                batch = next(batches)
                batch = sharding.global_batch(batch, mesh)
                weights = (jnp.asarray(token_weights_fn(step)),) if token_weights_fn else ()
                state, metrics = jitted(state, *step_args, batch, *weights)
                # At most one step in flight: a SIGTERM is acted on after the step that is running, not after a
                # queue of dispatched ones (preemption notices give ~30 s). The first step is waited for itself.
                jax.block_until_ready(metrics if previous is None else previous)
                previous = metrics
                if step == start:  # img/s and the ETA exclude compiling
                    t_last, step_last = time.time(), step + 1
                    print(f'[{stage}] compiled and ran the first step in {t_last - t0:.1f} s', flush=True)
                pending.append(metrics)
                done = step + 1
                stop = ckpt.should_stop(done)
                if done % config.log_every == 0 or done == total_steps or stop or done % config.save_every == 0:
                    if bool(jax.device_get(state['nonfinite'])):
                        raise NonFiniteError(
                            f'[{stage}] a NaN/Inf loss or gradient appeared before step {done}; the update was '
                            f'skipped and the last good checkpoint (step {ckpt.latest_step()}) in {stage_dir} is '
                            f'kept. Lower the learning rate (tblr) or check the data.'
                        )
                if done % config.log_every == 0 or done == total_steps:
                    host = jax.device_get(pending)
                    mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    pending = []
                    now = time.time()
                    timed = done - step_last  # 0 when the first step alone ends a log interval
                    img_s = timed * batch_size / max(now - t_last, 1e-9)
                    eta = (total_steps - done) * (now - t_last) / timed if timed else float('nan')
                    t_last, step_last = now, done
                    print(_log_line(stage, done, total_steps, mean, img_s, eta), flush=True)  # the progress line
                    if writer:
                        for k, v in mean.items():
                            writer.scalar(f'{stage}/{k}', v, done)
                        writer.scalar(f'{stage}/img_per_s', img_s, done)
                        writer.flush()
                ckpt.save(done, state, force=stop or done == total_steps)
                if on_sample and (done % config.sample_every == 0 or done == total_steps):
                    on_sample(state['params'], done)
                if on_eval and ((config.eval_every and done % config.eval_every == 0) or done == total_steps):
                    results = on_eval(state['params'], done)
                    print(
                        f'[{stage}] eval at step {done}: ' + ' '.join(f'{k} {v:.4g}' for k, v in results.items()),
                        flush=True,
                    )
                    if writer:
                        for k, v in results.items():
                            writer.scalar(f'{stage}/eval/{k}', v, done)
                        writer.flush()
                if stop:
                    break
        if ckpt.preempted:
            raise Preempted(
                f'[{stage}] preempted: saved step {done} in {stage_dir}; run the same command again to resume'
            )
    finally:  # every exit: the save in flight finishes (a complete newest checkpoint, no writer-thread errors)
        ckpt.close()
        if writer:
            writer.close()
    return state
