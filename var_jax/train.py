"""Training of both stages: the tokenizer (stage 1) and the transformer (stage 2).

Each stage is a pure, jitted step `(state, batch) -> (state, metrics)` over one mesh with explicit
shardings (params replicated or FSDP-split, batch split over all devices, state donated), driven
by one loop (`fit`) that handles resume, checkpoints, preemption, logging and sample grids.

The transformer recipe is the official one (VAR_SPEC 4): AdamW (0.9, 0.95) with the official
no-decay groups, lr = tblr * batch / 256 with the 'lin0' warm-up / hold / linear-decay schedule,
a cosine weight-decay schedule, global-norm clipping at 2.0, 10% label dropout, drop path, plain
mean cross-entropy over all tokens, optional progressive training and bf16 compute.
"""
import functools
import logging
import math
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from var_jax import api, sharding
from var_jax.checkpoint import DEFAULT_RESUMABLE_KEYS, Checkpointer
from var_jax.images import save_png
from var_jax.models import lpips
from var_jax.models.discriminator import PatchDiscriminator
from var_jax.models.var import VAR, begin_ends
from var_jax.models.vqvae import VQVAE

# Params without weight decay (official: ndim == 1, biases, and these names).
NO_DECAY_NAMES = ('pos_start', 'pos_1LC', 'lvl_embed', 'ada_gss', 'scale_mul')


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the offending update was not applied."""


# --- schedules and optimizer -------------------------------------------------------------------
def lr_schedule(peak: float, total_steps: int, warmup_steps: int, wp0: float = 0.005, wpe: float = 0.01,
                pg: float = 0.0) -> optax.Schedule:
    """The official lr schedule: linear warm-up from wp0*peak, then 'lin0' or, with progressive
    training (pg > 0), 'lin<pg>'.

    lin0 holds the peak for 5% of the rest, then decays linearly to wpe*peak. lin<T> decays
    linearly to mid*peak at fraction T, then to wpe*peak, with mid = (1 + wpe + (1-wpe)(1-T))/2.
    """
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = wp0 + (1 - wp0) * step / max(warmup_steps, 1)
        pasd = (step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1)
        if pg:
            mid = (1 + wpe + (1 - wpe) * (1 - pg)) / 2
            after = jnp.where(pasd < pg, 1 + (mid - 1) * pasd / pg, wpe + (mid - wpe) * (1 - pasd) / (1 - pg))
        else:
            after = jnp.where(pasd < 0.05, 1.0, wpe + (1 - wpe) * (1 - pasd) / 0.95)
        return peak * jnp.where(step < warmup_steps, warm, after)
    return schedule


def cosine_wd_schedule(wd: float, wd_end: float, total_steps: int) -> optax.Schedule:
    """Official weight decay: cosine from wd at step 0 to wd_end at the last step."""
    def schedule(step):
        frac = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
        return wd_end + (wd - wd_end) * (0.5 + 0.5 * jnp.cos(math.pi * frac))
    return schedule


def decay_mask(params):
    """True for params with weight decay: not 1-D and not a position/level/gain parameter."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        k: v.ndim > 1 and not any(name in part for part in k for name in NO_DECAY_NAMES)
        for k, v in flat.items()})


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, batch_size: int,
                   pg: float = 0.0) -> optax.GradientTransformation:
    """AdamW with the official lr / wd schedules and global-norm clipping.

    cfg: tblr (lr per 256 images), warmup_steps, wp0, wpe, wd, wd_end, clip, beta1, beta2.
    pg: progressive-training fraction (selects the official 'lin<pg>' lr schedule).
    """
    peak = cfg.tblr * batch_size / 256
    tx = optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
        learning_rate=lr_schedule(peak, total_steps, cfg.warmup_steps, cfg.wp0, cfg.wpe, pg),
        b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
        weight_decay=cosine_wd_schedule(cfg.wd, cfg.wd_end, total_steps), mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), tx) if cfg.clip > 0 else tx


# --- losses ------------------------------------------------------------------------------------
def var_loss(var: VAR, params, labels, x, targets, token_weights, *, label_smoothing: float = 0.0,
             train: bool = False, rng=None):
    """Official transformer loss: sum_l w_l CE_l, averaged over the batch, and per-token stats.

    token_weights (L,) are 1/L for every token (the plain mean) unless progressive training
    masks or ramps later scales.
    """
    logits = var.apply({'params': params}, labels, x, train=train, rngs={'dropout': rng} if train else {})
    V = logits.shape[-1]
    onehot = jax.nn.one_hot(targets, V)
    if label_smoothing:
        onehot = onehot * (1 - label_smoothing) + label_smoothing / V
    ce = optax.softmax_cross_entropy(logits, onehot)  # (B, L)
    loss = jnp.mean(jnp.sum(ce * token_weights, axis=-1))
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, (ce, correct)


def _scale_means(x, patch_nums):
    """(B, L) -> (num_scales,) means over each scale's tokens."""
    return jnp.stack([x[:, b:e].mean() for b, e in begin_ends(patch_nums)])


# --- train states and steps --------------------------------------------------------------------
def make_var_step(vqvae: VQVAE, var: VAR, tx: optax.GradientTransformation, label_smoothing: float):
    """Transformer step: tokenize with the frozen VQVAE, teacher-force, AdamW. Pure in its inputs."""
    def step(state, vae_params, batch, token_weights):
        rng = jax.random.fold_in(state['rng'], state['step'])
        idx = vqvae.apply({'params': vae_params}, batch['image'], method=VQVAE.img_to_idx)
        x = vqvae.apply({'params': vae_params}, idx, method=VQVAE.idx_to_var_input)
        targets = jnp.concatenate(idx, axis=1)
        grad_fn = jax.value_and_grad(var_loss, argnums=1, has_aux=True)
        (loss, (ce, correct)), grads = grad_fn(var, state['params'], batch['label'], x, targets, token_weights,
                                               label_smoothing=label_smoothing, train=True, rng=rng)
        grad_norm = optax.tree.norm(grads)
        # NaN pixels still give valid token ids; flag them like a NaN loss.
        loss = jnp.where(jnp.all(jnp.isfinite(batch['image'])), loss, jnp.nan)
        ls, accs = _scale_means(ce, var.patch_nums), _scale_means(correct, var.patch_nums) * 100
        new = _apply_update(state, grads, tx, loss, grad_norm)
        metrics = dict(loss=loss, Lm=ce.mean(), Lt=ls[-1], Accm=correct.mean() * 100, Acct=accs[-1],
                       grad_norm=grad_norm, lr=_current_lr(new['opt_state']))
        metrics.update({f'L_{pn}': l for pn, l in zip(var.patch_nums, ls)})
        metrics.update({f'acc_{pn}': a for pn, a in zip(var.patch_nums, accs)})
        return new, metrics
    return step


def make_vae_step(vqvae: VQVAE, tx: optax.GradientTransformation, l1: float, l2: float, restart_every: int = 0,
                  disc: Optional[PatchDiscriminator] = None, disc_tx: Optional[optax.GradientTransformation] = None,
                  disc_weight: float = 0.0, disc_start: int = 0, perceptual: lpips.LPIPS | None = None,
                  perceptual_weight: float = 0.0):
    """Tokenizer step: L1 + L2 reconstruction + the quantizer's VQ loss, straight-through.

    With restart_every > 0, codes that no scale picked during the last restart_every steps are
    re-seeded with latent vectors of the current batch (dead-code restart; at step 0 this seeds
    the codebook from data). This counters the codebook collapse VQ training is prone to.

    With disc_weight > 0 (and a `disc` / `disc_tx`), the VQGAN adversarial game is added (see
    `_make_vae_gan_step`); the state must then hold 'disc_params' and 'disc_opt_state'.

    With perceptual_weight > 0 (and an LPIPS module `perceptual`), perceptual_weight * mean
    LPIPS(reconstruction, image) joins the reconstruction loss and the step takes the frozen
    LPIPS params as an argument: `step(state, lpips_params, batch)`; otherwise `step(state, batch)`.
    """
    if perceptual_weight > 0 and perceptual is None:
        raise ValueError('perceptual_weight > 0 needs an LPIPS module')
    rec_loss = functools.partial(_reconstruction_loss, l1=l1, l2=l2, perceptual=perceptual,
                                 perceptual_weight=perceptual_weight)
    if disc_weight > 0:
        if disc is None or disc_tx is None:
            raise ValueError('disc_weight > 0 needs a discriminator and its optimizer')
        vae_step = _make_vae_gan_step(vqvae, tx, rec_loss, restart_every, disc, disc_tx, disc_weight, disc_start)
    else:
        def vae_step(state, lpips_params, batch):
            def loss_fn(params):
                rec, vq_loss, hits, f = vqvae.apply({'params': params}, batch['image'])
                nll, terms = rec_loss(rec, batch['image'], lpips_params)
                return nll + vq_loss, (terms, vq_loss, hits, f)
            (loss, (terms, vq_loss, hits, f)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
            grad_norm = optax.tree.norm(grads)
            new = _apply_update(state, grads, tx, loss, grad_norm)
            metrics = dict(loss=loss, **terms, vq=vq_loss, grad_norm=grad_norm, lr=_current_lr(new['opt_state']))
            return _finish_vae_step(state, new, metrics, hits, f, vqvae.patch_nums, restart_every)
    if perceptual_weight > 0:
        return vae_step

    def step(state, batch):
        return vae_step(state, None, batch)
    return step


def _reconstruction_loss(rec, image, lpips_params, *, l1, l2, perceptual, perceptual_weight):
    """l1 * L1 + l2 * L2 (+ perceptual_weight * mean LPIPS when perceptual_weight > 0) and its terms."""
    err = rec - image
    l1_loss, l2_loss = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
    nll, terms = l1 * l1_loss + l2 * l2_loss, dict(rec_l1=l1_loss, rec_l2=l2_loss)
    if perceptual_weight > 0:
        terms['perceptual'] = jnp.mean(perceptual.apply({'params': lpips_params}, rec, image))
        nll = nll + perceptual_weight * terms['perceptual']
    return nll, terms


def _finish_vae_step(state, new, metrics, hits, f, patch_nums, restart_every: int):
    """Shared tail of both tokenizer steps: per-scale codebook usage and the dead-code restart."""
    usage = jnp.mean(hits > 0, axis=-1) * 100  # share of the codebook each scale used in this batch, %
    metrics.update({f'usage_{pn}': u for pn, u in zip(patch_nums, usage)})
    if restart_every > 0:
        new = _restart_dead_codes(new, state['code_hits'] + hits.sum(0), f, restart_every)
    return new, metrics


# --- adversarial tokenizer training (optional) -------------------------------------------------
def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: (mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))) / 2."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake):
    """Generator adversarial loss: -mean(D(fake))."""
    return -jnp.mean(logits_fake)


def last_layer(params):
    """The decoder's last layer kernel, against which VQGAN balances the two losses."""
    return params['decoder']['conv_out']['kernel']


def adaptive_weight(nll_grad, g_grad, disc_weight: float):
    """VQGAN's lambda = ||grad nll|| / (||grad g_loss|| + 1e-4), clipped to [0, 1e4], times disc_weight.

    Both gradients are w.r.t. the last decoder layer; the result carries no gradient.
    """
    w = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


def new_disc_state(disc: PatchDiscriminator, disc_tx: optax.GradientTransformation, image_size: int, seed: int):
    """The discriminator's entries of the tokenizer train state: 'disc_params', 'disc_opt_state'."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0xD15C)
    params = disc.init(key, jnp.zeros((1, image_size, image_size, 3)))['params']
    return dict(disc_params=params, disc_opt_state=disc_tx.init(params))


def make_disc_optimizer(lr: float) -> optax.GradientTransformation:
    """taming's discriminator optimizer: Adam (0.5, 0.9), constant lr, no weight decay."""
    return optax.adam(lr, b1=0.5, b2=0.9)


def _make_vae_gan_step(vqvae, tx, rec_loss, restart_every, disc, disc_tx, disc_weight, disc_start):
    """VQGAN tokenizer step: rec + disc_factor * lambda * g_loss + vq, then a hinge discriminator step.

    rec (VQGAN's nll) is `rec_loss`: L1 + L2 and, when on, the perceptual term.

    disc_factor is 1 from step disc_start on (state['step'] before this update), else 0: before
    disc_start the generator gets exactly the plain reconstruction + VQ gradients and the
    discriminator is left untouched. lambda is `adaptive_weight` of the gradients of the
    reconstruction (nll) and adversarial terms w.r.t. the decoder's conv_out kernel. The model's
    forward is linearized once (jax.vjp); the two kernel gradients are pullbacks of the two
    terms' cotangents through it (XLA drops the parts of those pullbacks that do not reach the
    kernel). The generator is updated with the current discriminator; the discriminator then
    learns real images vs the stop_gradient reconstructions of the same forward pass.
    """
    def step(state, lpips_params, batch):
        image = batch['image']
        params, disc_params = state['params'], state['disc_params']

        def forward(p):
            rec, vq_loss, hits, f = vqvae.apply({'params': p}, image)
            return (rec, vq_loss), (hits, f)
        (rec, vq_loss), pullback, (hits, f) = jax.vjp(forward, params, has_aux=True)
        (nll, terms), d_nll = jax.value_and_grad(rec_loss, has_aux=True)(rec, image, lpips_params)
        g_fn = lambda r: generator_adv_loss(disc.apply({'params': disc_params}, r))
        g_loss, d_g = jax.value_and_grad(g_fn)(rec)
        zero = jnp.zeros_like(vq_loss)
        nll_grad = last_layer(pullback((d_nll, zero))[0])
        g_grad = last_layer(pullback((d_g, zero))[0])
        active = state['step'] >= disc_start
        w = jnp.where(active, adaptive_weight(nll_grad, g_grad, disc_weight), 0.0)
        loss = nll + w * g_loss + vq_loss
        grads = pullback((d_nll + w * d_g, jnp.ones_like(vq_loss)))[0]
        grad_norm = optax.tree.norm(grads)
        new = _apply_update(state, grads, tx, loss, grad_norm)

        # Discriminator: real vs the (fixed) reconstructions of this step.
        fake = jax.lax.stop_gradient(rec)

        def d_loss_fn(dp):
            logits_real = disc.apply({'params': dp}, image)
            logits_fake = disc.apply({'params': dp}, fake)
            return hinge_d_loss(logits_real, logits_fake), (jnp.mean(logits_real), jnp.mean(logits_fake))
        (d_loss, (logits_real, logits_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
        d_updates, d_opt_state = disc_tx.update(d_grads, state['disc_opt_state'], disc_params)
        d_params = optax.apply_updates(disc_params, d_updates)
        d_ok = jnp.isfinite(d_loss) & jnp.isfinite(optax.tree.norm(d_grads))
        take = active & d_ok
        keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(take, a, b), n, o)
        new = dict(new, disc_params=keep(d_params, disc_params),
                   disc_opt_state=keep(d_opt_state, state['disc_opt_state']),
                   nonfinite=new['nonfinite'] | (active & ~d_ok))

        metrics = dict(loss=loss, **terms, vq=vq_loss, grad_norm=grad_norm,
                       lr=_current_lr(new['opt_state']), g_loss=g_loss, d_loss=d_loss,
                       disc_weight_adaptive=w, logits_real=logits_real, logits_fake=logits_fake)
        return _finish_vae_step(state, new, metrics, hits, f, vqvae.patch_nums, restart_every)
    return step


def _restart_dead_codes(state, code_hits, f, every: int):
    """Every `every` steps, replaces never-hit codes by random latent vectors of the batch."""
    flat = jax.lax.stop_gradient(f).reshape(-1, f.shape[-1])
    key = jax.random.fold_in(jax.random.fold_in(state['rng'], state['step']), 1)
    pick = flat[jax.random.randint(key, (code_hits.shape[0],), 0, flat.shape[0])]
    now = (state['step'] - 1) % every == 0  # state['step'] was already incremented
    dead = now & (code_hits == 0)
    codebook = state['params']['quantize']['embedding']
    params = dict(state['params'], quantize=dict(state['params']['quantize'],
                                                 embedding=jnp.where(dead[:, None], pick, codebook)))
    return dict(state, params=params, code_hits=jnp.where(now, 0, code_hits))


def _current_lr(opt_state):
    for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'hyperparams')):
        if hasattr(s, 'hyperparams'):
            return s.hyperparams['learning_rate']
    return jnp.nan


def _apply_update(state, grads, tx, loss, grad_norm):
    """AdamW update, skipped (state kept, flag raised) when the loss or gradients are not finite."""
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return dict(state, params=keep(params, state['params']), opt_state=keep(opt_state, state['opt_state']),
                step=state['step'] + 1, data_position=state['data_position'] + 1,
                nonfinite=state['nonfinite'] | ~finite)


def new_state(params, tx, seed: int):
    """The checkpointed train state: params, optimizer state, step, rng, data position."""
    return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                rng=jax.random.PRNGKey(seed), data_position=jnp.zeros((), jnp.int32),
                nonfinite=jnp.zeros((), bool))


# --- progressive training ----------------------------------------------------------------------
def progressive_token_weights(patch_nums, step: int, total_steps: int, warmup_steps: int,
                              pg: float, pg0: int, pgwp_steps: int) -> np.ndarray:
    """(L,) loss weights of the official progressive schedule (all 1/L when pg == 0).

    Stage prog_si trains scales <= prog_si (later tokens weight 0: with block-causal attention
    this equals truncating the sequence); its newest scale ramps from 0.01 to 1 over pgwp_steps,
    except in the first stage. Weights are not renormalised, as in the official trainer.
    """
    be = begin_ends(patch_nums)
    L, K = be[-1][1], len(patch_nums)
    w = np.full(L, 1.0 / L, np.float32)
    if not pg:
        return w

    def prog_si(it):
        if it <= warmup_steps:
            return pg0
        if it >= total_steps * pg:
            return K - 1
        progress = min(max((it - warmup_steps) / (total_steps * pg - warmup_steps), 0), 1)
        return pg0 + round(progress * (K - 1 - pg0))

    si = prog_si(step)
    if si == K - 1:  # the last stage trains everything, as if not progressive
        return w
    lo, hi = 0, step  # prog_si is non-decreasing in the step: bisect for the stage's first step
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if prog_si(mid) < si else (lo, mid)
    ramp = 1.0 if si == pg0 else max(min((step - lo + 1) / max(pgwp_steps, 1), 1.0), 0.01)
    w[be[si][1]:] = 0
    w[be[si][0]:be[si][1]] *= ramp
    return w


# --- the loop ----------------------------------------------------------------------------------
def _log_line(stage, step, total, metrics, img_per_s, eta_s):
    keys = [k for k in ('loss', 'Lm', 'Lt', 'Accm', 'Acct', 'rec_l1', 'perceptual', 'vq', 'g_loss', 'd_loss',
                        'grad_norm', 'lr')
            if k in metrics]
    vals = ' '.join(f'{k} {metrics[k]:.4g}' for k in keys)
    return f'[{stage}] step {step}/{total} {vals} | {img_per_s:.1f} img/s | ETA {eta_s / 60:.1f} min'


def fit(stage: str, workdir: str, config, *, state, state_shardings, mesh, step_fn: Callable,
        step_args: tuple, total_steps: int, batch_size: int, on_sample: Optional[Callable] = None,
        token_weights_fn: Optional[Callable] = None):
    """Runs `step_fn(state, *step_args, batch[, token_weights]) -> (state, metrics)` to total_steps.

    Resumes from workdir/<stage>'s latest checkpoint; saves every config.save_every steps, at the
    end and on SIGTERM; writes TensorBoard scalars and calls on_sample(params, step) every
    config.sample_every steps and at the end. Returns the final state.
    """
    from var_jax import input_pipeline  # TensorFlow is only needed for the input pipeline
    from flax.metrics import tensorboard

    stage_dir = os.path.join(workdir, stage)
    ckpt = Checkpointer(stage_dir, max_to_keep=config.keep_checkpoints, save_every=config.save_every,
                        config=config,
                        resumable_keys=DEFAULT_RESUMABLE_KEYS + RESUMABLE_KEYS + OTHER_STAGE_KEYS.get(stage, ()))
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(sharding.with_shardings(state, state_shardings))
        logging.info('[%s] resumed from step %d of %s', stage, start, stage_dir)
    if start >= total_steps:
        ckpt.close()
        return state
    batches = input_pipeline.make_train_iterator(config.data, batch_size, seed=config.seed, start_step=start)
    writer = tensorboard.SummaryWriter(os.path.join(stage_dir, 'tb')) if jax.process_index() == 0 else None
    batch_sharding = sharding.batch_sharding(mesh)
    data_shardings = {'image': batch_sharding, 'label': batch_sharding}
    extra = (sharding.replicated(mesh),) if token_weights_fn else ()
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, *[sharding.replicated(mesh)] * len(step_args),
                                            data_shardings, *extra),
                     out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    t0, t_last, step_last = time.time(), time.time(), start
    pending = []
    with ckpt.handle_preemption():
        for step in range(start, total_steps):
            batch = next(batches)
            batch = sharding.global_batch({'image': batch['image'], 'label': batch['label']}, mesh)
            weights = (jnp.asarray(token_weights_fn(step)),) if token_weights_fn else ()
            state, metrics = jitted(state, *step_args, batch, *weights)
            pending.append(metrics)
            done = step + 1
            stop = ckpt.should_stop(done)
            if done % config.log_every == 0 or done == total_steps or stop or done % config.save_every == 0:
                if bool(jax.device_get(state['nonfinite'])):
                    ckpt.close()
                    if writer:
                        writer.close()
                    raise NonFiniteError(
                        f'[{stage}] a NaN/Inf loss or gradient appeared before step {done}; the update was '
                        f'skipped and the last good checkpoint (step {ckpt.latest_step()}) in {stage_dir} is '
                        f'kept. Lower the learning rate (tblr) or check the data.')
            if done % config.log_every == 0 or done == total_steps:
                host = jax.device_get(pending)
                mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                pending = []
                now = time.time()
                img_s = (done - step_last) * batch_size / max(now - t_last, 1e-9)
                eta = (total_steps - done) * (now - t_last) / max(done - step_last, 1)
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
            if stop:
                logging.warning('[%s] preempted: saved step %d, exiting', stage, done)
                break
    ckpt.close()
    if writer:
        writer.close()
    logging.info('[%s] finished in %.1f s', stage, time.time() - t0)
    if ckpt.preempted:
        raise SystemExit(f'preempted at step {done}; run the same command again to resume')
    return state


# --- the two stages ----------------------------------------------------------------------------
RESUMABLE_KEYS = ('*total_steps', '*log_every*', '*sample_every*', '*save_every*', '*keep_checkpoints*',
                  'sample', 'sample.*', 'mesh', 'mesh.*', 'distributed', 'stages', '*perceptual_weights_path')
# Config sections a stage's checkpoints do not depend on: the other stage's own settings (so the
# transformer can be retuned on a finished tokenizer, and the reverse, in the same workdir).
OTHER_STAGE_KEYS = {'tokenizer': ('transformer', 'var'), 'transformer': ('tokenizer',)}


def build_from_config(config):
    """(VQVAE, VAR) from config.vae / config.var; the VAR takes vocabulary/Cvae/scales from the VQVAE.

    var.num_classes <= 0 means the dataset's number of classes.
    """
    var_kwargs = config.var.to_dict()
    R = config.vae.patch_nums[-1] * 2 ** (len(config.vae.ch_mult) - 1)
    if config.data.image_size != R:
        raise ValueError(f'data.image_size={config.data.image_size} but the tokenizer maps {R} px images to its '
                         f'last scale {config.vae.patch_nums[-1]}; set data.image_size={R} or change '
                         f'vae.patch_nums / vae.ch_mult')
    if var_kwargs['num_classes'] <= 0:
        from var_jax import input_pipeline
        var_kwargs['num_classes'] = input_pipeline.num_classes(config.data)
    return api.build_models(config.vae, var_kwargs)


def export_dir(workdir: str) -> str:
    """Where a run leaves its final models, in the format of `python -m var_jax.convert`."""
    return os.path.join(workdir, 'export')


def _mesh(config):
    return sharding.make_mesh(config.mesh.fsdp)


def _init_state(mesh, tx, seed, init_fn=None, params=None, extra=None):
    """Train state created already sharded: from init_fn(key), or around given (pretrained) params.

    extra: additional state entries (e.g. the tokenizer's code hit counts).
    """
    extra = extra or {}
    if params is None:
        return sharding.init_sharded(lambda key: new_state(init_fn(key), tx, seed) | extra, mesh,
                                     jax.random.PRNGKey(seed))
    make = lambda p: new_state(p, tx, seed) | extra
    shardings = sharding.param_sharding(mesh, jax.eval_shape(make, params))
    params = jax.device_put(params, shardings['params'])
    return jax.jit(make, out_shardings=shardings)(params), shardings


def _load_init_from(config):
    """The converted / exported checkpoint named by config.init_from: (model cfg, params) or None."""
    from var_jax import convert
    if not config.init_from:
        return None
    if not os.path.isdir(config.init_from):
        raise FileNotFoundError(f'init_from={config.init_from!r} does not exist; point it at a directory '
                                f'written by python -m var_jax.convert or at a finished run\'s export/')
    return convert.load_pretrained(config.init_from)


def _check_same_model(name, cfg_from_ckpt: dict, model) -> None:
    for k, v in cfg_from_ckpt.items():
        if getattr(model, k, v) != v and k != 'dtype':
            raise ValueError(f'init_from {name} has {k}={v} but the config builds {k}={getattr(model, k)}; '
                             f'set config.{name}.{k} = {v!r} (or leave init_from empty)')


def train_tokenizer(config, workdir: str):
    """Stage 1: trains the VQVAE (or takes config.init_from's); exports it; returns its params."""
    from var_jax import convert
    vqvae, _ = build_from_config(config)
    pre = _load_init_from(config)
    if pre is not None and 'vae' in pre[1]:
        _check_same_model('vae', pre[0]['vae'], vqvae)
        logging.info('tokenizer: using %s (no stage-1 training)', config.init_from)
        return pre[1]['vae']
    cfg = config.tokenizer
    mesh = _mesh(config)
    tx = make_optimizer(cfg.optim, cfg.total_steps, cfg.batch_size)
    R = vqvae.image_size
    extra = dict(code_hits=jnp.zeros((vqvae.vocab_size,), jnp.int32))
    step_kw = {}
    if cfg.disc_weight > 0:
        disc = PatchDiscriminator(ndf=cfg.disc_ndf, n_layers=cfg.disc_layers)
        disc_tx = make_disc_optimizer(cfg.disc_lr)
        extra.update(new_disc_state(disc, disc_tx, R, config.seed))
        step_kw = dict(disc=disc, disc_tx=disc_tx, disc_weight=cfg.disc_weight, disc_start=cfg.disc_start)
    frozen = ()  # step arguments that are not trained: the LPIPS params
    if cfg.perceptual_weight > 0:
        if not cfg.perceptual_weights_path:
            raise ValueError(f'tokenizer.perceptual_weight={cfg.perceptual_weight} needs '
                             f'tokenizer.perceptual_weights_path. {lpips.WHERE_TO_GET}')
        frozen = (jax.device_put(lpips.load_lpips_params(cfg.perceptual_weights_path), sharding.replicated(mesh)),)
        step_kw.update(perceptual=lpips.LPIPS(), perceptual_weight=cfg.perceptual_weight)
    state, shardings = _init_state(mesh, tx, config.seed, lambda k: vqvae.init(k, jnp.zeros((1, R, R, 3)))['params'],
                                   extra=extra)
    recon = jax.jit(lambda p, img: vqvae.apply({'params': p}, img)[0])
    first = _fixed_images(config, 16)

    def on_sample(params, step):
        if jax.process_index() == 0:
            rec = jnp.clip(recon(params, first), -1, 1)
            path = os.path.join(workdir, 'tokenizer', 'samples', f'recon_{step:07d}.png')
            save_png(path, np.concatenate([first, np.asarray(rec)]) * 0.5 + 0.5, ncols=16)

    state = fit('tokenizer', workdir, config, state=state, state_shardings=shardings, mesh=mesh,
                step_fn=make_vae_step(vqvae, tx, cfg.l1, cfg.l2, cfg.restart_every, **step_kw),
                step_args=frozen,
                total_steps=cfg.total_steps,
                batch_size=cfg.batch_size, on_sample=on_sample)
    params = jax.device_get(state['params'])
    if jax.process_index() == 0:
        convert.save_pretrained(os.path.join(workdir, 'tokenizer', 'export'), _model_cfg(vqvae), params)
    return params


def _fixed_images(config, n):
    from var_jax import input_pipeline
    batch = next(input_pipeline.make_eval_iterator(config.data, n, process_index=0, process_count=1))
    return batch['image'][:n]


def _model_cfg(model) -> dict:
    """Constructor kwargs of a linen module (its dataclass fields), JSON-friendly."""
    out = {}
    for name in model.__dataclass_fields__:
        if name in ('parent', 'name'):
            continue
        v = getattr(model, name)
        out[name] = str(jnp.dtype(v)) if name == 'dtype' else v
    return out


def _tokenizer_params(pre, workdir):
    """The frozen tokenizer: from init_from's checkpoint (`pre`) if it holds one, else stage 1's export."""
    from var_jax import convert
    if pre is not None and 'vae' in pre[1]:
        return pre[1]['vae']
    path = os.path.join(workdir, 'tokenizer', 'export')
    if not os.path.isdir(path):
        raise FileNotFoundError(f'no tokenizer for the transformer stage: {path} does not exist. Run the '
                                f'tokenizer stage first (config.stages includes "tokenizer") or set '
                                f'config.init_from to a converted checkpoint with a VQVAE')
    return convert.load_pretrained(path)[1]['vae']


def train_transformer(config, workdir: str, vae_params=None):
    """Stage 2: trains the VAR on the frozen tokenizer's tokens; exports both models."""
    from var_jax import convert
    vqvae, var = build_from_config(config)
    pre = _load_init_from(config)
    vae_params = _tokenizer_params(pre, workdir) if vae_params is None else vae_params
    from var_jax import input_pipeline
    if input_pipeline.num_classes(config.data) > var.num_classes:
        raise ValueError(f'the dataset has {input_pipeline.num_classes(config.data)} classes but var.num_classes='
                         f'{var.num_classes}; set var.num_classes to at least that (or 0 to follow the data)')
    cfg = config.transformer
    mesh = _mesh(config)
    tx = make_optimizer(cfg.optim, cfg.total_steps, cfg.batch_size, pg=cfg.pg)
    if pre is not None and 'var' in pre[1]:
        _check_same_model('var', pre[0]['var'], var)
        state, shardings = _init_state(mesh, tx, config.seed, params=pre[1]['var'])
    else:
        L = sum(p * p for p in var.patch_nums)
        x = jnp.zeros((1, L - var.patch_nums[0] ** 2, var.cvae))
        state, shardings = _init_state(mesh, tx, config.seed,
                                       lambda k: var.init(k, jnp.zeros((1,), jnp.int32), x)['params'])
    vae_params = jax.device_put(vae_params, sharding.replicated(mesh))
    weights = functools.partial(progressive_token_weights, var.patch_nums, total_steps=cfg.total_steps,
                                warmup_steps=cfg.optim.warmup_steps, pg=cfg.pg, pg0=cfg.pg0,
                                pgwp_steps=cfg.pgwp_steps)

    if not cfg.pg:  # constant weights: one device array, no per-step host work
        uniform = jnp.asarray(weights(0))
        weights = lambda step: uniform

    def on_sample(params, step):
        from var_jax import sampling
        from var_jax.generate import parse_labels
        s = config.sample
        labels = parse_labels(s.labels, s.num_images, var.num_classes)
        out = sampling.sample(vqvae, vae_params, var, params, labels, jax.random.PRNGKey(s.seed), cfg=s.cfg,
                              top_k=s.top_k, top_p=s.top_p, temperature=s.temperature, more_smooth=s.more_smooth)
        if jax.process_index() == 0:
            save_png(os.path.join(workdir, 'transformer', 'samples', f'samples_{step:07d}.png'),
                     np.asarray(out['images']), ncols=config.sample.ncols)

    state = fit('transformer', workdir, config, state=state, state_shardings=shardings, mesh=mesh,
                step_fn=make_var_step(vqvae, var, tx, cfg.label_smoothing), step_args=(vae_params,),
                total_steps=cfg.total_steps, batch_size=cfg.batch_size, on_sample=on_sample,
                token_weights_fn=weights)
    params = jax.device_get(state['params'])
    if jax.process_index() == 0:
        convert.save_pretrained(export_dir(workdir), _model_cfg(vqvae), jax.device_get(vae_params),
                                _model_cfg(var), params)
    return params


def run(config, workdir: str):
    """The stages named in config.stages, in order ('tokenizer,transformer' by default)."""
    stages = [s.strip() for s in config.stages.split(',') if s.strip()]
    unknown = set(stages) - {'tokenizer', 'transformer'}
    if unknown:
        raise ValueError(f'unknown stages {sorted(unknown)} in config.stages={config.stages!r}; '
                         f'use "tokenizer", "transformer" or "tokenizer,transformer"')
    vae_params = train_tokenizer(config, workdir) if 'tokenizer' in stages else None
    if 'transformer' in stages:
        train_transformer(config, workdir, vae_params)
