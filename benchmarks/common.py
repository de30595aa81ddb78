"""What the benchmarks share: the repository on sys.path, the CPU malloc setting, `--config` as in main.py,
and the three programs they time or compile (transformer train step, tokenizer train step, sampler).

Each program is built from the run config exactly as training and sampling build it (the trainers' step
functions, the optimizer of the config, the sharding rules); `*_program` returns the jitted function and
abstract arguments (shapes, dtypes, shardings), so the same code is compiled for this host
(benchmarks/train.py, sample.py) or ahead of time for a TPU topology (benchmarks/aot.py).
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from var_jax import runtime  # noqa: E402

runtime.keep_freed_memory_on_cpu()  # before JAX starts its thread pool (see the docstring)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from var_jax import optim, sampling, sharding  # noqa: E402
from var_jax.trainers import loop, tokenizer, transformer  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'bench.py')


def define_config_flag():
    """--config=configs/<name>.py with --config.<field>=... overrides, as main.py (typos are refused)."""
    config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'model config file (configs/*.py)', lock_config=True)


def config():
    return flags.FLAGS.config


def models(config):
    """(VQVAE, VAR) of the config, as training builds them."""
    return loop.models_from_config(config)


def seq_len(var) -> int:
    return sum(p * p for p in var.patch_nums)


def with_shardings(tree, shardings):
    """Abstract arrays (jax.ShapeDtypeStruct) of tree's shapes and dtypes with the given shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_state(mesh, tx, init_fn, extra=None):
    """(abstract train state with shardings, its shardings): `loop.new_state` of init_fn's params, shapes only."""
    make = lambda key: loop.new_state(init_fn(key), tx, 0) | (extra or {})
    shapes = jax.eval_shape(make, jax.random.PRNGKey(0))
    shardings = sharding.param_sharding(mesh, shapes)
    return with_shardings(shapes, shardings), shardings


def abstract_vae_params(vqvae, mesh):
    R = vqvae.image_size
    shapes = jax.eval_shape(lambda k: vqvae.init(k, jnp.zeros((1, R, R, 3)))['params'], jax.random.PRNGKey(0))
    return with_shardings(shapes, jax.tree.map(lambda _: sharding.replicated(mesh), shapes))


def var_init_fn(var):
    x = jnp.zeros((1, seq_len(var) - var.patch_nums[0] ** 2, var.cvae))
    return lambda key: var.init(key, jnp.zeros((1,), jnp.int32), x)['params']


def image_batch(vqvae, batch: int, mesh):
    R, bs = vqvae.image_size, sharding.batch_sharding(mesh)
    return {
        'image': jax.ShapeDtypeStruct((batch, R, R, 3), jnp.float32, sharding=bs),
        'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs),
    }


def token_batch(var, batch: int, mesh):
    """A pre-tokenised batch (config.data.pretokenize): token ids of all scales and labels."""
    bs = sharding.batch_sharding(mesh)
    return {
        'tokens': jax.ShapeDtypeStruct((batch, seq_len(var)), jnp.int32, sharding=bs),
        'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs),
    }


def transformer_program(config, vqvae, var, mesh, batch: int):
    """(jitted transformer step, abstract (state, vae_params, batch, token_weights), its optimizer).

    With config.data.pretokenize the step takes token maps ({'tokens', 'label'}) and runs no encoder, as
    training then does; otherwise images.
    """
    cfg = config.transformer
    tx = optim.make_optimizer(cfg.optim, cfg.total_steps, batch, pg=cfg.pg)
    state, shardings = abstract_state(mesh, tx, var_init_fn(var))
    rep, bs = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    L = seq_len(var)
    weights = jax.ShapeDtypeStruct((L,), jnp.float32, sharding=rep)
    vae_params = abstract_vae_params(vqvae, mesh)
    step = jax.jit(
        transformer.make_step(vqvae, var, tx, cfg.label_smoothing, cfg.grad_accum),
        in_shardings=(shardings, rep, bs, rep),
        out_shardings=(shardings, rep),
        donate_argnums=0,
    )
    data = token_batch(var, batch, mesh) if config.data.pretokenize else image_batch(vqvae, batch, mesh)
    return step, (state, vae_params, data, weights), tx


def tokenizer_program(config, vqvae, mesh, batch: int):
    """(jitted tokenizer step (reconstruction + VQ loss, no GAN / LPIPS), abstract (state, batch), optimizer)."""
    cfg = config.tokenizer
    tx = optim.make_optimizer(cfg.optim, cfg.total_steps, batch)
    R = vqvae.image_size
    extra = dict(code_hits=jnp.zeros((vqvae.vocab_size,), jnp.int32))
    state, shardings = abstract_state(mesh, tx, lambda k: vqvae.init(k, jnp.zeros((1, R, R, 3)))['params'], extra)
    bs = sharding.batch_sharding(mesh)
    step = jax.jit(
        tokenizer.make_step(vqvae, tx, cfg.l1, cfg.l2, cfg.restart_every),
        in_shardings=(shardings, {'image': bs, 'label': bs}),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    batch_args = image_batch(vqvae, batch, mesh)
    return step, (state, batch_args), tx


def sampler_program(config, vqvae, var, device, batch: int):
    """(the compiled-once scale loop of `sampling.sample`, abstract args) for one device, the config's
    sample settings (cfg on, top-k, top-p); the decode to pixels is `decode_program`."""
    s = config.sample
    fn = sampling.compiled_loop(vqvae, var, int(s.top_k), bool(s.top_p > 0), bool(s.more_smooth), False)
    on = _on_device(device)
    scalar = on(jax.ShapeDtypeStruct((), jnp.float32))
    args = (
        on(vae_shapes(vqvae)),
        on(jax.eval_shape(var_init_fn(var), jax.random.PRNGKey(0))),
        on(jax.ShapeDtypeStruct((batch,), jnp.int32)),
        on(jax.eval_shape(lambda: jax.random.PRNGKey(0))),
        scalar,
        scalar,
        scalar,
    )
    return fn, args


def decode_program(vqvae, device, batch: int):
    """(the sampler's compiled decode f_hat -> images, abstract args) for one device."""
    pn = vqvae.patch_nums[-1]
    on = _on_device(device)
    return sampling.compiled_decode(vqvae), (
        on(vae_shapes(vqvae)),
        on(jax.ShapeDtypeStruct((batch, pn, pn, vqvae.z_channels), jnp.float32)),
    )


def vae_shapes(vqvae):
    R = vqvae.image_size
    return jax.eval_shape(lambda k: vqvae.init(k, jnp.zeros((1, R, R, 3)))['params'], jax.random.PRNGKey(0))


def _on_device(device):
    """tree -> the same abstract arrays placed on `device`."""
    one = jax.sharding.SingleDeviceSharding(device)
    return lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), t)


def analytic_flops(var, batch: int, train: bool = True) -> float:
    """Model FLOPs of the transformer: 2 * matmul params * tokens + attention (QK^T and AV over the
    block-causal pairs a kernel must compute, counted dense as the official code does), x3 for training."""
    C, L, D = var.embed_dim, seq_len(var), var.depth
    per_token = D * (4 * C * C + 2 * C * round(C * var.mlp_ratio)) + C * var.vocab_size + var.cvae * C
    attn = D * 2 * 2 * L * L * C
    return (3 if train else 1) * (2 * per_token * L + attn) * batch
