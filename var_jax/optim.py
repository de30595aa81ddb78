"""The official VAR optimizer: AdamW (0.9, 0.95) with its no-decay groups, lr and weight-decay schedules.

lr = tblr * batch / 256 (official utils/arg_util.py), linear warm-up from wp0 * peak, then the 'lin0' schedule (or
'lin<pg>' with progressive training), a cosine weight-decay schedule and global-norm clipping.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from var_jax.models.stacking import BLOCKS

# Params without weight decay (official: ndim == 1, biases, and these names).
NO_DECAY_NAMES = ('pos_start', 'pos_1LC', 'lvl_embed', 'ada_gss', 'scale_mul')


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
    """True for params with weight decay: not 1-D (per block: the VAR's stacked block params carry a
    leading depth axis) and not a position/level/gain parameter."""
    flat = traverse_util.flatten_dict(params)
    ndim = lambda k, v: v.ndim - (k[0] == BLOCKS)
    return traverse_util.unflatten_dict({
        k: ndim(k, v) > 1 and not any(name in part for part in k for name in NO_DECAY_NAMES)
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


def current_lr(opt_state):
    """The learning rate the last update used (from inject_hyperparams' state), NaN if none."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'hyperparams')):
        if hasattr(s, 'hyperparams'):
            return s.hyperparams['learning_rate']
    return jnp.nan
