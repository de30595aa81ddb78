"""The official VAR optimizer: AdamW (0.9, 0.95) with its no-decay groups, lr and weight-decay schedules.

lr = tblr * batch / 256 (official utils/arg_util.py), linear warm-up from wp0 * peak, then the official schedule
(`optim.sche`: 'lin0' by default, 'lin<pg>' with progressive training; 'lin', 'lin00', 'cos', 'exp'), a cosine
weight-decay schedule and global-norm clipping.
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


def schedule_name(sche: str = '', pg: float = 0.0) -> str:
    """The official train.py's choice: --sche (default 'lin0'), or 'lin<pg>' with progressive training."""
    return sche or (f'lin{pg:g}' if pg else 'lin0')


def lr_schedule(
    peak: float, total_steps: int, warmup_steps: int, wp0: float = 0.005, wpe: float = 0.01, sche: str = 'lin0'
) -> optax.Schedule:
    """The official lr schedules (utils/lr_control.py lr_wd_annealing): linear warm-up from wp0*peak, then, over
    the fraction p of the rest, down to wpe*peak:

    'lin0' / 'lin' hold the peak for 5% / 15% of the rest, then decay linearly; 'lin00' decays linearly at once;
    'lin<T>' (progressive training) decays linearly to mid*peak at T, then to wpe*peak, with
    mid = (1 + wpe + (1-wpe)(1-T))/2; 'cos' is a half cosine; 'exp' holds for 15%, then decays exponentially.
    """
    hold = {'lin0': 0.05, 'lin': 0.15, 'exp': 0.15}
    if sche not in ('cos', 'lin00', *hold):
        try:
            T = float(sche[3:]) if sche.startswith('lin') else None
        except ValueError:
            T = None
        if T is None or not 0 < T < 1:
            raise ValueError(
                f"optim.sche={sche!r}: use 'lin0', 'lin', 'lin00', 'lin<T>' (0 < T < 1), 'cos' or 'exp' "
                f'(the official --sche)'
            )

    def after_warmup(p):
        if sche == 'cos':
            return wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(math.pi * p))
        if sche == 'lin00':
            return wpe + (1 - wpe) * (1 - p)
        if sche in hold:
            T = hold[sche]
            decay = jnp.exp((p - T) / (1 - T) * math.log(wpe)) if sche == 'exp' else wpe + (1 - wpe) * (1 - p) / (1 - T)
            return jnp.where(p < T, 1.0, decay)
        T = float(sche[3:])
        mid = (1 + wpe + (1 - wpe) * (1 - T)) / 2
        return jnp.where(p < T, 1 + (mid - 1) * p / T, wpe + (mid - wpe) * (1 - p) / (1 - T))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = wp0 + (1 - wp0) * step / max(warmup_steps, 1)
        p = (step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1)
        return peak * jnp.where(step < warmup_steps, warm, after_warmup(p))

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
    return traverse_util.unflatten_dict(
        {k: ndim(k, v) > 1 and not any(name in part for part in k for name in NO_DECAY_NAMES) for k, v in flat.items()}
    )


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, batch_size: int, pg: float = 0.0
) -> optax.GradientTransformation:
    """AdamW with the official lr / wd schedules and global-norm clipping.

    cfg: tblr (lr per 256 images), warmup_steps, wp0, wpe, wd, wd_end, clip, beta1, beta2, sche (see
    `schedule_name`; '' = the official default). pg: progressive-training fraction (the default is then 'lin<pg>').
    """
    peak = cfg.tblr * batch_size / 256
    sche = schedule_name(cfg.get('sche', ''), pg)
    tx = optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
        learning_rate=lr_schedule(peak, total_steps, cfg.warmup_steps, cfg.wp0, cfg.wpe, sche),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=1e-8,
        weight_decay=cosine_wd_schedule(cfg.wd, cfg.wd_end, total_steps),
        mask=decay_mask,
    )
    return optax.chain(optax.clip_by_global_norm(cfg.clip), tx) if cfg.clip > 0 else tx


def current_lr(opt_state):
    """The learning rate the last update used (from inject_hyperparams' state), NaN if none."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'hyperparams')):
        if hasattr(s, 'hyperparams'):
            return s.hyperparams['learning_rate']
    return jnp.nan
