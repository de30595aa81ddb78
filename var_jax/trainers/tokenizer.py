"""Stage 1: the multi-scale VQVAE tokenizer.

Loss: l1 * L1 + l2 * L2 reconstruction (+ an optional LPIPS perceptual term) + the quantizer's beta-weighted
VQ loss through the straight-through estimator, with per-scale codebook usage, dead-code restart and an
optional VQGAN PatchGAN discriminator (hinge loss, adaptive weight). `train` runs the stage and exports it.
"""

import functools
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax import checkpoint, losses, optim, recon_metrics, reference_stats, sharding
from var_jax.errors import MissingFileError
from var_jax.images import save_png
from var_jax.models import lpips
from var_jax.models.discriminator import PatchDiscriminator
from var_jax.models.vqvae import VQVAE
from var_jax.trainers import loop


def make_step(
    vqvae: VQVAE,
    tx: optax.GradientTransformation,
    l1: float,
    l2: float,
    restart_every: int = 0,
    disc: Optional[PatchDiscriminator] = None,
    disc_tx: Optional[optax.GradientTransformation] = None,
    disc_weight: float = 0.0,
    disc_start: int = 0,
    perceptual: lpips.LPIPS | None = None,
    perceptual_weight: float = 0.0,
):
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
    rec_loss = functools.partial(
        _reconstruction_loss, l1=l1, l2=l2, perceptual=perceptual, perceptual_weight=perceptual_weight
    )
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
            new = loop.apply_update(state, grads, tx, loss, grad_norm)
            metrics = dict(loss=loss, **terms, vq=vq_loss, grad_norm=grad_norm, lr=optim.current_lr(new['opt_state']))
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
def last_layer(params):
    """The decoder's last layer kernel, against which VQGAN balances the two losses."""
    return params['decoder']['conv_out']['kernel']


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
    discriminator is left untouched. lambda is `losses.adaptive_weight` of the gradients of the
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
        g_fn = lambda r: losses.generator_adv_loss(disc.apply({'params': disc_params}, r))
        g_loss, d_g = jax.value_and_grad(g_fn)(rec)
        zero = jnp.zeros_like(vq_loss)
        nll_grad = last_layer(pullback((d_nll, zero))[0])
        g_grad = last_layer(pullback((d_g, zero))[0])
        active = state['step'] >= disc_start
        w = jnp.where(active, losses.adaptive_weight(nll_grad, g_grad, disc_weight), 0.0)
        loss = nll + w * g_loss + vq_loss
        grads = pullback((d_nll + w * d_g, jnp.ones_like(vq_loss)))[0]
        grad_norm = optax.tree.norm(grads)
        new = loop.apply_update(state, grads, tx, loss, grad_norm)

        # Discriminator: real vs the (fixed) reconstructions of this step.
        fake = jax.lax.stop_gradient(rec)

        def d_loss_fn(dp):
            logits_real = disc.apply({'params': dp}, image)
            logits_fake = disc.apply({'params': dp}, fake)
            return losses.hinge_d_loss(logits_real, logits_fake), (jnp.mean(logits_real), jnp.mean(logits_fake))

        (d_loss, (logits_real, logits_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
        d_updates, d_opt_state = disc_tx.update(d_grads, state['disc_opt_state'], disc_params)
        d_params = optax.apply_updates(disc_params, d_updates)
        d_ok = jnp.isfinite(d_loss) & jnp.isfinite(optax.tree.norm(d_grads))
        take = active & d_ok
        keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(take, a, b), n, o)
        new = dict(
            new,
            disc_params=keep(d_params, disc_params),
            disc_opt_state=keep(d_opt_state, state['disc_opt_state']),
            nonfinite=new['nonfinite'] | (active & ~d_ok),
        )

        metrics = dict(
            loss=loss,
            **terms,
            vq=vq_loss,
            grad_norm=grad_norm,
            lr=optim.current_lr(new['opt_state']),
            g_loss=g_loss,
            d_loss=d_loss,
            disc_weight_adaptive=w,
            logits_real=logits_real,
            logits_fake=logits_fake,
        )
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
    params = dict(
        state['params'], quantize=dict(state['params']['quantize'], embedding=jnp.where(dead[:, None], pick, codebook))
    )
    return dict(state, params=params, code_hits=jnp.where(now, 0, code_hits))


def tokenizer_export_dir(workdir: str) -> str:
    """Where stage 1 leaves the tokenizer for stage 2 (model.json + params, like a converted checkpoint)."""
    return os.path.join(workdir, 'tokenizer', 'export')


def train(config, workdir: str, pretrained=None):
    """Stage 1: trains the VQVAE, or takes the one in `pretrained` (config.init_from's); returns its params."""
    vqvae, _ = loop.models_from_config(config)
    if pretrained is not None and 'vae' in pretrained[1]:
        checkpoint.check_model_config('vae', pretrained[0]['vae'], vqvae)
        logging.info('tokenizer: using %s (no stage-1 training)', config.init_from)
        return pretrained[1]['vae']
    cfg = config.tokenizer
    mesh = sharding.make_mesh(config.mesh.fsdp)
    tx = optim.make_optimizer(cfg.optim, cfg.total_steps, cfg.batch_size)
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
            raise ValueError(
                f'tokenizer.perceptual_weight={cfg.perceptual_weight} needs '
                f'tokenizer.perceptual_weights_path. {lpips.WHERE_TO_GET}'
            )
        frozen = (jax.device_put(lpips.load_lpips_params(cfg.perceptual_weights_path), sharding.replicated(mesh)),)
        step_kw.update(perceptual=lpips.LPIPS(), perceptual_weight=cfg.perceptual_weight)
    state, shardings = loop.init_state(
        mesh, tx, config.seed, lambda k: vqvae.init(k, jnp.zeros((1, R, R, 3)))['params'], extra=extra
    )
    recon = jax.jit(lambda p, img: vqvae.apply({'params': p}, img)[0])
    first = _fixed_images(config, 16)

    def on_sample(params, step):
        if jax.process_index() == 0:
            rec = jnp.clip(recon(params, first), -1, 1)
            path = os.path.join(workdir, 'tokenizer', 'samples', f'recon_{step:07d}.png')
            save_png(path, np.concatenate([first, np.asarray(rec)]) * 0.5 + 0.5, ncols=16)

    stage = loop.Stage(
        'tokenizer',
        make_step(vqvae, tx, cfg.l1, cfg.l2, cfg.restart_every, **step_kw),
        cfg.total_steps,
        cfg.batch_size,
        step_args=frozen,
        on_sample=on_sample,
        on_eval=_reconstruction_eval(config, workdir, vqvae, mesh),
    )
    state = loop.fit(stage, workdir, config, state=state, state_shardings=shardings, mesh=mesh)
    params = jax.tree.map(sharding.to_host, state['params'])  # FSDP shards may sit on other hosts
    checkpoint.save_pretrained(tokenizer_export_dir(workdir), {'vae': checkpoint.model_config(vqvae)}, {'vae': params})
    return params


def _reconstruction_eval(config, workdir: str, vqvae: VQVAE, mesh):
    """on_eval for `fit`: PSNR, per-scale codebook usage / perplexity and (with Inception weights) rFID over
    config.eval.val_batches eval-split batches, also written to tokenizer/eval/results_<step>.json; None when
    val_batches is 0."""
    from var_jax import data

    if not config.eval.val_batches:
        return None
    fid = reference_stats.training_fid_setup(config, vqvae.image_size, mesh)

    def on_eval(params, step):
        batches = data.make_eval_iterator(config.data, config.tokenizer.batch_size)
        results = recon_metrics.evaluate(vqvae, params, batches, mesh, config.eval.val_batches, fid)
        if jax.process_index() == 0:
            checkpoint.atomic_write_json(
                os.path.join(workdir, 'tokenizer', 'eval', f'results_{step:07d}.json'), results
            )
        return results

    return on_eval


def exported(workdir: str):
    """Stage 1's exported params, for stage 2 in a later command."""
    path = tokenizer_export_dir(workdir)
    if not os.path.isdir(path):
        raise MissingFileError(
            f'no tokenizer for the transformer stage: {path} does not exist. Run the '
            f'tokenizer stage first (config.stages includes "tokenizer") or set '
            f'config.init_from to a converted checkpoint with a VQVAE'
        )
    return checkpoint.load_pretrained(path)[1]['vae']


def _fixed_images(config, n):
    """The first n images of the eval split: the same reconstructions at every sample step."""
    from var_jax import data

    batch = next(data.make_eval_iterator(config.data, n, process_index=0, process_count=1))
    return batch['image'][:n]
