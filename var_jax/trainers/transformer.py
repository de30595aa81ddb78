"""Stage 2: the VAR transformer on the frozen tokenizer's tokens, the official recipe (train.py, trainer.py).

Each step tokenizes the batch with the frozen VQVAE (or, with data.pretokenize, reads token maps the frozen
VQVAE encoded once: `pretokenized_batches`), builds the teacher-forcing input and takes the plain mean
cross-entropy over all tokens (optionally label-smoothed), with 10% label dropout, drop path and
AdamW (`var_jax.optim`). Progressive training (pg > 0) trains coarse scales first: the sequence is cut to
the active scales and the newest scale's loss weight ramps up over pgwp epochs, as the official trainer does.
"""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax import checkpoint, losses, metrics, optim, reference_stats, sample_batches, sharding
from var_jax.images import save_png
from var_jax.models.var import VAR, begin_ends
from var_jax.models.vqvae import VQVAE
from var_jax.trainers import loop


def var_loss(
    var: VAR, params, labels, x, targets, token_weights, *, label_smoothing: float = 0.0, train: bool = False, rng=None
):
    """Official transformer loss: sum_l w_l CE_l, averaged over the batch, and per-token stats.

    token_weights (L,) are 1/L for every token (the plain mean) unless progressive training
    masks or ramps later scales. The cross-entropy is `losses.cross_entropy`: no one-hot or
    log-softmax copy of the (B, L, V) logits.
    """
    logits = var.apply({'params': params}, labels, x, train=train, rngs={'dropout': rng} if train else {})
    ce, correct = losses.cross_entropy(logits, targets, label_smoothing)  # (B, L)
    loss = jnp.mean(jnp.sum(ce * token_weights, axis=-1))
    return loss, (ce, correct.astype(jnp.float32))


def _scale_means(x, patch_nums):
    """(B, L') -> (num_scales,) means over each scale's tokens; NaN for scales beyond L' (progressive)."""
    return jnp.stack([x[:, b:e].mean() if e <= x.shape[1] else jnp.float32(jnp.nan) for b, e in begin_ends(patch_nums)])


def micro_batches(batch: dict, k: int) -> dict:
    """(B, ...) arrays -> (k, B/k, ...): micro-batch j holds examples j, j + k, ..., so every device keeps an equal
    share of each (the batch is split over the devices along its first axis in contiguous blocks)."""
    return jax.tree.map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1), batch)


def make_step(vqvae: VQVAE, var: VAR, tx: optax.GradientTransformation, label_smoothing: float, grad_accum: int = 1):
    """Transformer step `(state, vae_params, batch, token_weights) -> (state, metrics)`: tokenize with the
    frozen VQVAE, teacher-force, AdamW. Pure in its inputs.

    batch: {'image': (B, R, R, 3), 'label'}, or {'tokens': int32 (B, L), 'label'} with the token ids of all
    scales concatenated (pre-tokenised data): then the encoder is not run at all.

    token_weights (L',) are the loss weights of the first L' tokens; L' < L (a scale boundary) trains
    only the scales before it, on the truncated sequence (progressive training). jit compiles once per L'.

    grad_accum k > 1 (the official --ac): the batch runs as k micro-batches of B/k in a scan inside the step, and
    their mean gradient (the full batch's: every micro-batch has the same size) makes one update; activation
    memory is that of B/k.
    """

    def loss_and_grads(params, vae_params, batch, token_weights, rng):
        end = token_weights.shape[0]
        if 'tokens' in batch:
            idx = [batch['tokens'][:, b:e] for b, e in begin_ends(vqvae.patch_nums)]
        else:
            idx = vqvae.apply({'params': vae_params}, batch['image'], method=VQVAE.img_to_idx)
        x = vqvae.apply({'params': vae_params}, idx, method=VQVAE.idx_to_var_input)
        targets = jnp.concatenate(idx, axis=1)[:, :end]
        x = x[:, : end - var.patch_nums[0] ** 2]
        grad_fn = jax.value_and_grad(var_loss, argnums=1, has_aux=True)
        return grad_fn(
            var, params, batch['label'], x, targets, token_weights, label_smoothing=label_smoothing, train=True, rng=rng
        )

    def step(state, vae_params, batch, token_weights):
        rng = jax.random.fold_in(state['rng'], state['step'])
        if grad_accum == 1:
            (loss, (ce, correct)), grads = loss_and_grads(state['params'], vae_params, batch, token_weights, rng)
        else:

            def micro(carry, inputs):
                j, mb = inputs
                (loss, aux), grads = loss_and_grads(
                    state['params'], vae_params, mb, token_weights, jax.random.fold_in(rng, j)
                )
                return jax.tree.map(jnp.add, carry, (loss, grads)), aux

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state['params']))
            (loss, grads), (ce, correct) = jax.lax.scan(
                micro, zeros, (jnp.arange(grad_accum), micro_batches(batch, grad_accum))
            )
            loss, grads = loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads)
            ce, correct = (a.reshape(-1, a.shape[-1]) for a in (ce, correct))
        grad_norm = optax.tree.norm(grads)
        if 'image' in batch:  # NaN pixels still give valid token ids; flag them like a NaN loss.
            loss = jnp.where(jnp.all(jnp.isfinite(batch['image'])), loss, jnp.nan)
        ls, accs = _scale_means(ce, var.patch_nums), _scale_means(correct, var.patch_nums) * 100
        new = loop.apply_update(state, grads, tx, loss, grad_norm)
        metrics = dict(
            loss=loss,
            Lm=ce.mean(),
            Lt=ls[-1],
            Accm=correct.mean() * 100,
            Acct=accs[-1],
            grad_norm=grad_norm,
            lr=optim.current_lr(new['opt_state']),
        )
        metrics.update({f'L_{pn}': l for pn, l in zip(var.patch_nums, ls)})
        metrics.update({f'acc_{pn}': a for pn, a in zip(var.patch_nums, accs)})
        return new, metrics

    return step


def make_eval_step(vqvae: VQVAE, var: VAR):
    """Validation `(var_params, vae_params, batch) -> {metric: (B,)}` per example: teacher forcing, no label
    drop, the plain mean CE (the loss), the finest scale's CE and the accuracies in %."""

    def step(params, vae_params, batch):
        idx = vqvae.apply({'params': vae_params}, batch['image'], method=VQVAE.img_to_idx)
        x = vqvae.apply({'params': vae_params}, idx, method=VQVAE.idx_to_var_input)
        targets = jnp.concatenate(idx, axis=1)
        weights = jnp.full(targets.shape[1:], 1.0 / targets.shape[1])
        _, (ce, correct) = var_loss(var, params, batch['label'], x, targets, weights)
        last = begin_ends(var.patch_nums)[-1][0]
        return dict(
            Lm=ce.mean(-1), Lt=ce[:, last:].mean(-1), Accm=correct.mean(-1) * 100, Acct=correct[:, last:].mean(-1) * 100
        )

    return step


# --- progressive training ----------------------------------------------------------------------
def pgwp_steps(cfg) -> int:
    """Steps over which a new progressive scale's loss weight ramps up; official default ep/300 epochs."""
    return cfg.pgwp_steps if cfg.pgwp_steps > 0 else max(round(cfg.total_steps / 300), 1)


def progressive_token_weights(
    patch_nums, step: int, total_steps: int, warmup_steps: int, pg: float, pg0: int, pgwp_steps: int
) -> np.ndarray:
    """(L',) loss weights of the official progressive schedule at `step` (all L tokens at 1/L when pg == 0).

    Stage prog_si trains scales <= prog_si: the weights stop at that scale's end (the step truncates
    the sequence there; with block-causal attention this equals weighting later tokens 0). The newest
    scale ramps from 0.01 to 1 over pgwp_steps, except in the first stage. Weights are 1/L, not
    renormalised, as in the official trainer.
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
    w = w[: be[si][1]]
    w[be[si][0] :] *= ramp
    return w


# --- the stage ---------------------------------------------------------------------------------
def train(config, workdir: str, num_data_classes: int, vae_params=None, pretrained=None):
    """Stage 2: trains the VAR on the frozen tokenizer's tokens; exports both models; returns the VAR params.

    vae_params: stage 1's result (else `pretrained`'s VQVAE or the run's tokenizer export);
    pretrained: config.init_from's (model cfgs, params), if any.
    """
    vqvae, var = loop.models_from_config(config, num_data_classes)
    if vae_params is None:
        from var_jax.trainers import tokenizer

        has_vae = pretrained is not None and 'vae' in pretrained[1]
        vae_params = pretrained[1]['vae'] if has_vae else tokenizer.exported(workdir)
    if num_data_classes > var.num_classes:
        raise ValueError(
            f'the dataset has {num_data_classes} classes but var.num_classes={var.num_classes}; '
            f'set var.num_classes to at least that (or 0 to follow the data)'
        )
    cfg = config.transformer
    mesh = sharding.make_mesh(config.mesh.fsdp)
    tx = optim.make_optimizer(cfg.optim, cfg.total_steps, cfg.batch_size, pg=cfg.pg)
    if pretrained is not None and 'var' in pretrained[1]:
        checkpoint.check_model_config('var', pretrained[0]['var'], var)
        state, shardings = loop.init_state(mesh, tx, config.seed, params=pretrained[1]['var'])
    else:
        L = sum(p * p for p in var.patch_nums)
        x = jnp.zeros((1, L - var.patch_nums[0] ** 2, var.cvae))
        state, shardings = loop.init_state(
            mesh, tx, config.seed, lambda k: var.init(k, jnp.zeros((1,), jnp.int32), x)['params']
        )
    rep = sharding.replicated(mesh)
    vae_params = jax.device_put(vae_params, rep)
    weights = functools.partial(
        progressive_token_weights,
        var.patch_nums,
        total_steps=cfg.total_steps,
        warmup_steps=cfg.optim.warmup_steps,
        pg=cfg.pg,
        pg0=cfg.pg0,
        pgwp_steps=pgwp_steps(cfg),
    )
    if not cfg.pg:  # constant weights: one device array, no per-step host work
        uniform = jnp.asarray(weights(0))
        weights = lambda step: uniform

    def on_sample(params, step):
        s = config.sample
        images = _samples(config, mesh, (vqvae, vae_params, var, params), s.num_images, s.labels, s.seed)
        if jax.process_index() == 0:
            save_png(os.path.join(workdir, 'transformer', 'samples', f'samples_{step:07d}.png'), images, ncols=s.ncols)

    stage = loop.Stage(
        'transformer',
        make_step(vqvae, var, tx, cfg.label_smoothing, cfg.grad_accum),
        cfg.total_steps,
        cfg.batch_size,
        step_args=(vae_params,),
        on_sample=on_sample,
        on_eval=_validation(config, vqvae, var, vae_params, mesh),
        token_weights_fn=weights,
        make_batches=pretokenized_batches(config, workdir, vqvae, vae_params) if config.data.pretokenize else None,
    )
    state = loop.fit(stage, workdir, config, state=state, state_shardings=shardings, mesh=mesh)
    params = jax.tree.map(sharding.to_host, state['params'])  # FSDP shards may sit on other hosts
    checkpoint.save_pretrained(
        checkpoint.export_dir(workdir),
        {'vae': checkpoint.model_config(vqvae), 'var': checkpoint.model_config(var)},
        {'vae': jax.device_get(vae_params), 'var': params},
    )
    return params


# --- pre-tokenised data (config.data.pretokenize) ------------------------------------------------
def pretokenized_batches(config, workdir: str, vqvae: VQVAE, vae_params):
    """make_batches for `loop.fit`: builds (or reuses) the token cache in <workdir>/tokens of the frozen
    tokenizer, then batches it from the step the run starts at (`var_jax.data.tokens`)."""
    from var_jax.data import tokens

    def make_batches(start_step):
        root = os.path.join(workdir, 'tokens')
        L = sum(p * p for p in vqvae.patch_nums)
        tokens.build_token_cache(
            config.data,
            root,
            tokens.make_encoder(vqvae, vae_params),
            fingerprint=tokens.tokenizer_fingerprint(vqvae, vae_params),
            seq_len=L,
            vocab_size=vqvae.vocab_size,
            seed=config.seed,
        )
        return tokens.make_token_iterator(root, config.transformer.batch_size, seed=config.seed, start_step=start_step)

    return make_batches


def _validation(config, vqvae, var, vae_params, mesh):
    """on_eval for `fit` (every config.eval_every steps and at the end), or None when it has nothing to do:

    * validation loss / accuracy over config.eval.val_batches batches of the eval split (teacher forcing, no
      label drop), the official trainer's periodic evaluation;
    * the FID of config.eval.train_num_images samples (config.sample's settings, a fixed key, classes spread
      evenly) against the reference statistics, when Inception weights are configured.
    """
    from var_jax import data

    e = config.eval
    fid = reference_stats.training_fid_setup(config, vqvae.image_size, mesh) if e.train_num_images else None
    if not e.val_batches and fid is None:
        return None
    batch_size = config.transformer.batch_size
    bs, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    step = jax.jit(make_eval_step(vqvae, var), in_shardings=(rep, rep, {'image': bs, 'label': bs}), out_shardings=rep)

    def on_eval(params, _):
        sums, n = {}, 0
        for batch in itertools.islice(data.make_eval_iterator(config.data, batch_size), e.val_batches):
            batch = sharding.global_batch(batch, mesh)
            mask = sharding.to_host(batch.pop('mask')).astype(bool)  # every host's, in the outputs' order
            for k, v in jax.device_get(step(params, vae_params, batch)).items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(v[mask]))
            n += int(mask.sum())
        results = {f'val_{k}': v / max(n, 1) for k, v in sums.items()}
        if fid is not None:
            images = _samples(
                config, mesh, (vqvae, vae_params, var, params), e.train_num_images, '', config.sample.seed + 1
            )
            results['fid'] = metrics.fid_of_images(images, *fid)
        return results

    return on_eval


def _samples(config, mesh, models, num_images: int, labels: str, seed: int) -> np.ndarray:
    """num_images images in [0, 1] (every host gets all of them) with config.sample's settings."""
    s = config.sample
    labels = sample_batches.parse_labels(labels, num_images, models[2].num_classes)
    batches = sample_batches.sample_batches(
        models,
        labels,
        jax.random.PRNGKey(seed),
        sample_batches.settings(s),
        batch_size=sample_batches.batch_size_for(s.batch_size, num_images, mesh),
        mesh=mesh,
    )
    return np.concatenate([sharding.to_host(out['images'])[:n] for _, n, out in batches])
