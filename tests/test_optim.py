"""var_jax.optim against the official recipe: lr and wd schedules, weight-decay groups, AdamW, clipping."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from var_jax import optim
from var_jax.trainers import transformer

import train_worker
from official_schedules import official_lr, official_wd
from train_runs import small_config


# =============================================================================================
# Schedules, weight-decay groups, AdamW
# =============================================================================================
@pytest.mark.parametrize('sche', ['lin0', 'lin', 'lin00', 'lin0.6', 'cos', 'exp'])
@pytest.mark.parametrize(
    'total,warmup,wp0,wpe', [(1000, 50, 0.005, 0.1), (100, 0, 0.005, 0.01), (37, 5, 0.1, 0.05), (20, 17, 0.005, 0.5)]
)
def test_lr_schedules_match_official(sche, total, warmup, wp0, wpe):
    sched = jax.jit(optim.lr_schedule(3e-4, total, warmup, wp0, wpe, sche))
    steps = np.arange(total)
    got = np.asarray(jax.vmap(sched)(steps))
    want = np.array([official_lr(s, 3e-4, warmup, total, wp0, wpe, sche) for s in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)


def test_schedule_choice_is_the_official_default_and_refuses_unknown_names():
    assert optim.schedule_name('', 0.0) == 'lin0' and optim.schedule_name('', 0.5) == 'lin0.5'
    assert optim.schedule_name('cos', 0.5) == 'cos'  # an explicit --sche wins, as in the official train.py
    for bad in ('linear', 'lin1.5', 'cosine'):
        with pytest.raises(ValueError, match='optim.sche'):
            optim.lr_schedule(1.0, 10, 2, sche=bad)
    cfg = _optim(sche='cos', warmup_steps=0)
    got = _hyperparams_per_step(optim.make_optimizer(cfg, 10, 256), 10)[:, 0]
    np.testing.assert_allclose(got, [official_lr(s, 1e-4, 0, 10, 0.005, 0.1, 'cos') for s in range(10)], rtol=2e-6)


@pytest.mark.parametrize('wd,wd_end,total', [(0.05, 0.05, 100), (0.05, 0.08, 1000), (0.1, 0.0, 7)])
def test_cosine_wd_matches_official(wd, wd_end, total):
    sched = optim.cosine_wd_schedule(wd, wd_end, total)
    got = np.array([float(sched(s)) for s in range(total)])
    want = np.array([official_wd(s, wd, wd_end, total) for s in range(total)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose([got[0], got[-1]], [wd, wd_end], rtol=1e-6, atol=1e-9)


def _optim(**kw):
    base = dict(
        tblr=1e-4, warmup_steps=5, wp0=0.005, wpe=0.1, wd=0.05, wd_end=0.08, clip=2.0, beta1=0.9, beta2=0.95, sche=''
    )
    return ml_collections.ConfigDict(dict(base, **kw))


def _hyperparams_per_step(tx, n):
    """(lr, wd) that tx applies at updates 0..n-1 (zero gradients on a toy tree)."""
    params = {'w': jnp.ones((2, 3)), 'b': jnp.ones((3,))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []  # one compile, then n cheap calls
    for _ in range(n):
        _, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
        # inject_hyperparams keeps the values of the update it just applied.
        (inject,) = [
            s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'hyperparams')) if hasattr(s, 'hyperparams')
        ]
        out.append([float(inject.hyperparams['learning_rate']), float(inject.hyperparams['weight_decay'])])
    return np.array(out)


def test_make_optimizer_wires_the_official_schedules():
    """lr = tblr * batch / 256 with 'lin0', cosine wd, as applied update by update."""
    cfg, total, batch = _optim(), 30, 768
    got = _hyperparams_per_step(optim.make_optimizer(cfg, total, batch), total)
    peak = 1e-4 * 768 / 256
    np.testing.assert_allclose(got[:, 0], [official_lr(s, peak, 5, total, 0.005, 0.1) for s in range(total)], rtol=2e-6)
    np.testing.assert_allclose(got[:, 1], [official_wd(s, 0.05, 0.08, total) for s in range(total)], rtol=1e-6)


def _expected_decay(path):
    """The official no-decay rule spelled out for our names: decayed are exactly the weight matrices."""
    decayed = (
        'class_emb/embedding',
        'word_embed/kernel',
        'attn/mat_qkv/kernel',
        'attn/proj/kernel',
        'ffn/fc1/kernel',
        'ffn/fc2/kernel',
        'ada_lin/kernel',
        'shared_ada_lin/kernel',
        'head/kernel',
    )
    return any(path == d or path.endswith('/' + d) for d in decayed)


@pytest.mark.parametrize('shared_aln', [False, True])
def test_decay_mask_is_the_official_groups(shared_aln):
    from var_jax import api

    _, var = api.build_models(train_worker.VAE, dict(train_worker.VAR, shared_aln=shared_aln))
    params = jax.eval_shape(var.init, jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 20, 8)))[
        'params'
    ]
    mask = {'/'.join(k): v for k, v in traverse_util.flatten_dict(optim.decay_mask(params)).items()}
    names = set(mask)
    # The blocks' params are stacked (a leading depth axis): their biases are 2-D and still not decayed.
    must_have = [
        'pos_start',
        'pos_1LC',
        'lvl_embed/embedding',
        'blocks/attn/q_bias',
        'blocks/attn/v_bias',
        'blocks/attn/scale_mul',
        'blocks/ffn/fc2/bias',
        'word_embed/bias',
        'head/bias',
        'head_nm/ada_lin/kernel',
        'head_nm/ada_lin/bias',
        'class_emb/embedding',
    ]
    must_have += (
        ['blocks/ada_gss', 'shared_ada_lin/kernel', 'shared_ada_lin/bias']
        if shared_aln
        else ['blocks/ada_lin/kernel', 'blocks/ada_lin/bias']
    )
    assert set(must_have) <= names
    wrong = {n: mask[n] for n in names if mask[n] != _expected_decay(n)}
    assert not wrong, f'decay mask differs from the official groups: {wrong}'


def test_adamw_weight_decay_is_decoupled_and_masked():
    """Zero gradient: decayed params shrink by exactly lr * wd (p <- p - lr wd p), others stay."""
    cfg = _optim(tblr=0.1, warmup_steps=0, wd=0.05, wd_end=0.05)
    tx = optim.make_optimizer(cfg, 10, 256)  # lr at step 0 = 0.1
    params = {
        'blocks_0': {'ffn': {'fc1': {'kernel': jnp.full((3, 4), 2.0), 'bias': jnp.full((4,), 2.0)}}},
        'pos_1LC': jnp.full((5, 4), 2.0),
    }
    step = jax.jit(lambda p: optax.apply_updates(p, tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]))
    new = jax.device_get(step(params))
    np.testing.assert_allclose(new['blocks_0']['ffn']['fc1']['kernel'], 2.0 * (1 - 0.1 * 0.05), rtol=1e-6)
    np.testing.assert_array_equal(new['blocks_0']['ffn']['fc1']['bias'], 2.0)
    np.testing.assert_array_equal(new['pos_1LC'], 2.0)


def test_gradient_clipping_at_global_norm():
    """clip=2: a gradient of global norm 20 reaches AdamW scaled to norm 2 (the first Adam update is
    scale-free, so look at the first moment, which holds (1 - b1) * the clipped gradient)."""
    cfg = _optim(tblr=0.1, warmup_steps=0, wd=0.0, wd_end=0.0, clip=2.0)
    tx = optim.make_optimizer(cfg, 10, 256)
    params = {'w': jnp.zeros((2, 2))}
    g = {'w': jnp.full((2, 2), 10.0)}  # global norm 20
    _, state = jax.jit(tx.update)(g, tx.init(params), params)
    (adam,) = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'mu')) if hasattr(s, 'mu')]
    np.testing.assert_allclose(adam.mu['w'], (1 - 0.9) * 1.0, rtol=1e-6)  # clipped gradient: 1.0 per element


def test_progressive_training_uses_the_lin_pg_schedule(monkeypatch, tmp_path):
    config = small_config(
        str(tmp_path / 'data'),
        **{'transformer.pg': 0.5, 'transformer.total_steps': 40, 'transformer.optim.warmup_steps': 4},
    )
    captured = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        captured.append(real(*args, **kwargs))
        raise Stop

    real = optim.make_optimizer
    monkeypatch.setattr(optim, 'make_optimizer', spy)
    with pytest.raises(Stop):
        transformer.train(config, str(tmp_path), 10, vae_params={})
    got = _hyperparams_per_step(captured[0], 40)[:, 0]
    peak = config.transformer.optim.tblr * config.transformer.batch_size / 256
    want = [official_lr(s, peak, 4, 40, 0.005, config.transformer.optim.wpe, sche='lin0.5') for s in range(40)]
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_init_settings_of_the_config_reach_the_model():
    """var.init_std / init_head / init_adaln (the official --ini, --hd, --aln) set the initial weights' scales."""
    from configs import var_small
    from var_jax.trainers import loop

    def init_stds(**overrides):
        config = var_small.get_config()
        config.lock()  # as main.py's flags see it: a field the config does not have is refused
        config.var.update(dict(depth=1, embed_dim=64, num_heads=2, **overrides))
        _, var = loop.models_from_config(config)
        L = sum(p * p for p in var.patch_nums)
        params = var.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - 1, var.cvae)))['params']
        ada = np.asarray(params['blocks']['ada_lin']['kernel'])[0]  # (C, 6C): gamma1, gamma2, scales, shifts
        return dict(
            fc1=np.asarray(params['blocks']['ffn']['fc1']['kernel']).std(),
            head=np.asarray(params['head']['kernel']).std(),
            ada=ada[:, 2 * 64 :].std(),
        )

    base = init_stds()
    np.testing.assert_allclose(base['fc1'], math.sqrt(1 / (3 * 64)), rtol=0.1)  # official default std
    assert init_stds(init_std=0.05)['fc1'] == pytest.approx(0.05, rel=0.1)
    assert init_stds(init_head=0.2)['head'] == pytest.approx(10 * base['head'], rel=0.1)
    assert init_stds(init_adaln=0.05)['ada'] == pytest.approx(0.1 * base['ada'], rel=0.1)
