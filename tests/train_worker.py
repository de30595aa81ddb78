"""Subprocess half of tests/train_runs.py (a script; pytest does not collect it). Two modes:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python tests/train_worker.py sharded OUT_DIR

Runs transformer.make_step for two steps on the same tiny VQVAE + VAR, the same initial state and the
same batch under four meshes (1 device; 4-way data parallel; FSDP 2 and 4 with every param
split that has a divisible dimension), jitted as loop.fit does. Then, reusing the 1-device
executable (same shapes, no new compile), checks the non-finite guard, and runs it with the later
scales' token weights zeroed against the step compiled for the sequence truncated there (progressive
training; OUT_DIR/truncated_<end>.npz holds both updated params). Saves the FSDP-4 final
state with var_jax.checkpoint.Checkpointer in OUT_DIR/ckpt (restored on 1 device by the pytest
process), every number the tests need in OUT_DIR/result.json and that state in OUT_DIR/arrays.npz.

    python tests/train_worker.py main_paused STAGE STEP MAIN_PY_FLAGS...

main.py itself, except that stage STAGE sleeps after its step STEP (see main_paused).
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

# Shared with the tests of training (which import this module for them).
VAE = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
VAR = dict(depth=2, embed_dim=64, num_heads=2, num_classes=5, drop_path_rate=0.1, cond_drop_rate=0.1)
OPTIM = dict(tblr=0.05, warmup_steps=0, wp0=0.005, wpe=0.1, wd=0.05, wd_end=0.05, clip=2.0, beta1=0.9, beta2=0.95)
BATCH, TOTAL_STEPS, SEED, NUM_STEPS = 8, 10, 0, 2
LABEL_SMOOTHING = 0.1  # any value: the meshes must agree, and the truncated step must equal the masked one
MESHES = (('1dev', 1, 1), ('dp4', 4, 1), ('fsdp2', 4, 2), ('fsdp4', 4, 4))  # name, devices, fsdp


def _host_init(abstract, seed, std=None):
    """Deterministic numpy params of the given shapes, without compiling an init: normal matrices
    (std `std`, default 1/sqrt(fan-in)), unit norm scales, zero vectors otherwise.

    The VAR uses std 0.02 (the official init's scale): with fan-in std some fc1 units saturate, and
    Adam's normalisation of their near-zero gradients turns float summation-order noise between
    meshes into 1e-5 parameter differences."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        if len(a.shape) >= 2:
            return (rng.normal(0, 1, a.shape) * (std or 1 / np.sqrt(np.prod(a.shape[:-1])))).astype(a.dtype)
        ones = jax.tree_util.keystr(path).endswith("['scale']")
        return (np.ones if ones else np.zeros)(a.shape, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def build():
    """(vqvae, var, tx, vae_params, var_params, batch, token_weights), all deterministic numpy."""
    import jax.numpy as jnp

    from var_jax import api, optim

    vqvae, var = api.build_models(VAE, VAR)
    tx = optim.make_optimizer(ml_collections.ConfigDict(OPTIM), TOTAL_STEPS, BATCH)
    R, L = vqvae.image_size, sum(p * p for p in var.patch_nums)
    key = jax.random.PRNGKey(SEED)
    vae_params = _host_init(jax.eval_shape(vqvae.init, key, jnp.zeros((1, R, R, 3)))['params'], 1)
    var_params = _host_init(
        jax.eval_shape(var.init, key, jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - 1, var.cvae)))['params'],
        2,
        std=0.02,
    )
    rng = np.random.default_rng(0)
    batch = {
        'image': rng.uniform(-1, 1, (BATCH, R, R, 3)).astype(np.float32),
        'label': rng.integers(0, VAR['num_classes'], BATCH).astype(np.int32),
    }
    weights = np.full(L, 1.0 / L, np.float32)
    return vqvae, var, tx, vae_params, var_params, batch, weights


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _diffs(a, b):
    """{leaf: max |a - b|} over two trees of the same structure."""
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    return {k: float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) if fa[k].size else 0.0 for k in fa}


def _max_diff(a, b):
    return max(_diffs(a, b).values())


def _tree_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k], equal_nan=True) for k in fa)


def _sds(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=sharding), tree)


def sharded_steps(out_dir):
    from concurrent.futures import ThreadPoolExecutor

    from var_jax import sharding
    from var_jax.checkpoint import Checkpointer
    from var_jax.models.var import begin_ends
    from var_jax.trainers import loop, transformer

    vqvae, var, tx, vae_params, var_params, batch, weights = build()
    host_state = jax.device_get(loop.new_state(var_params, tx, SEED))
    step = transformer.make_step(vqvae, var, tx, label_smoothing=LABEL_SMOOTHING)
    devices = jax.devices()

    def compile_for(spec, n_tokens=len(weights)):
        """Jitted as loop.fit does; min_size=1 splits every leaf that has a dimension divisible by fsdp.
        n_tokens < L: the step of a progressive stage, on the sequence truncated there."""
        name, n, fsdp = spec
        mesh = sharding.make_mesh(fsdp, devices[:n])
        shardings = sharding.param_sharding(mesh, host_state, min_size=1)
        rep, bsh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        data_sh = {'image': bsh, 'label': bsh}
        jitted = jax.jit(
            step, in_shardings=(shardings, rep, data_sh, rep), out_shardings=(shardings, rep), donate_argnums=0
        )
        compiled = jitted.lower(
            sharding.with_shardings(host_state, shardings),
            _sds(vae_params, rep),
            {k: _sds(v, bsh) for k, v in batch.items()},
            _sds(weights[:n_tokens], rep),
        ).compile()
        put = lambda st, b=batch, w=weights: (
            jax.device_put(st, shardings),
            jax.device_put(vae_params, rep),
            sharding.global_batch(b, mesh),
            jax.device_put(w, rep),
        )
        return compiled, put

    # The progressive stages short of the full sequence end at these scale boundaries.
    cuts = [end for _, end in begin_ends(var.patch_nums)][1:-1]
    # The compiles are independent: overlap them (XLA releases the GIL while compiling).
    with ThreadPoolExecutor(len(MESHES) + len(cuts)) as pool:
        futures = {m[0]: pool.submit(compile_for, m) for m in MESHES}
        cut_futures = {end: pool.submit(compile_for, MESHES[0], end) for end in cuts}
        compiled = {name: f.result() for name, f in futures.items()}
        compiled_cuts = {end: f.result() for end, f in cut_futures.items()}

    res = {'n_devices': len(devices), 'meshes': {}}
    finals = {}
    for name, n, fsdp in MESHES:
        fn, put = compiled[name]
        state, *args = put(host_state)
        metrics = []
        for _ in range(NUM_STEPS):
            state, m = fn(state, *args)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        qkv = state['params']['blocks']['attn']['mat_qkv']['kernel']  # stacked: (depth, C, 3C)
        res['meshes'][name] = dict(
            mesh_shape=dict(state['step'].sharding.mesh.shape),
            metrics=metrics,
            qkv_spec=str(tuple(qkv.sharding.spec)),
            qkv_shard_shape=list(qkv.addressable_shards[0].data.shape),
            n_split_leaves=sum(any(ax is not None for ax in a.sharding.spec) for a in jax.tree.leaves(state)),
            n_leaves=len(jax.tree.leaves(state)),
            nonfinite=bool(state['nonfinite']),
            step=int(state['step']),
        )
        finals[name] = jax.device_get(state)
        if name == 'fsdp4':
            with Checkpointer(os.path.join(out_dir, 'ckpt'), save_every=1) as ckpt:
                ckpt.save(NUM_STEPS, state, force=True)
    ref = finals['1dev']
    for name in finals:
        d = _diffs(finals[name]['params'], ref['params'])
        res['meshes'][name]['max_param_diff'] = max(d.values())
        res['meshes'][name]['worst_param'] = max(d, key=d.get)
        res['meshes'][name]['max_opt_diff'] = _max_diff(finals[name]['opt_state'], ref['opt_state'])
        res['meshes'][name]['params_moved'] = _max_diff(finals[name]['params'], host_state['params'])
        res['meshes'][name]['rng_equal'] = bool(np.array_equal(finals[name]['rng'], ref['rng']))
    np.savez(os.path.join(out_dir, 'arrays.npz'), **_flat(finals['fsdp4']))

    # Non-finite guard, on the 1-device executable (same shapes and shardings: no new compile).
    fn, put = compiled['1dev']

    def guarded_step(state_host, b=batch):
        after, m = fn(*put(state_host, b))
        after = jax.device_get(after)
        return dict(
            loss=float(m['loss']),
            grad_norm=float(m['grad_norm']),
            nonfinite=bool(after['nonfinite']),
            params_unchanged=_tree_equal(after['params'], state_host['params']),
            opt_state_unchanged=_tree_equal(after['opt_state'], state_host['opt_state']),
            step=int(after['step']),
        ), after

    guard = {}
    guard['finite'], _ = guarded_step(host_state)
    poisoned = jax.tree.map(np.copy, host_state)
    poisoned['params']['head']['bias'][3] = np.nan
    guard['nan_param'], after = guarded_step(poisoned)
    # The flag is sticky: a later finite step keeps it raised (fit only looks every few steps).
    guard['finite_after_nan'], _ = guarded_step(dict(after, params=host_state['params']))
    huge = jax.tree.map(np.copy, host_state)
    huge['params']['head']['kernel'] *= np.float32(1e30)
    guard['huge_param'], _ = guarded_step(huge)
    guard['nan_images'], _ = guarded_step(host_state, dict(batch, image=np.full_like(batch['image'], np.nan)))
    res['guard'] = guard

    # A progressive stage's step on the truncated sequence vs the full-length 1-device step with the later
    # tokens weighted 0 and a ramped newest scale.
    res['truncated'] = {}
    for end in cuts:
        w = weights.copy()
        w[end:] = 0
        w[end - 2 : end] *= 0.3
        cut_fn, cut_put = compiled_cuts[end]
        cut, m_cut = cut_fn(*cut_put(host_state, w=w[:end]))
        full, m_full = fn(*put(host_state, w=w))
        res['truncated'][end] = {
            k: {n: float(v) for n, v in jax.device_get(m).items()} for k, m in (('cut', m_cut), ('full', m_full))
        }
        np.savez(
            os.path.join(out_dir, f'truncated_{end}.npz'),
            **{f'{k}{p}': v for k, st in (('cut', cut), ('full', full)) for p, v in _flat(st['params']).items()},
        )
    with open(os.path.join(out_dir, 'result.json'), 'w') as f:
        json.dump(res, f, indent=1)


def main_paused(stage, pause_at, argv):
    """main.py with its own flags, except that `stage` waits after its step `pause_at` (once its newest
    checkpoint is on disk), so that the test's SIGKILL or SIGTERM lands mid-run for sure."""
    import time

    from absl import app

    from var_jax import checkpoint

    save = checkpoint.Checkpointer.save

    def paused_save(self, step, state, force=False):
        out = save(self, step, state, force)
        if step == pause_at and os.path.basename(os.path.dirname(self.directory)) == stage:
            self.wait()
            print(f'PAUSED at step {step}', flush=True)
            deadline = time.time() + 600
            while not self.preempted and time.time() < deadline:  # until SIGKILL, or SIGTERM's flag
                time.sleep(0.05)
        return out

    checkpoint.Checkpointer.save = paused_save
    sys.argv = [os.path.join(REPO, 'main.py')] + argv
    import main as main_module

    app.run(main_module.main, flags_parser=main_module.parse_flags)


def main_interrupted(stage, at, argv):
    """main.py with its own flags, except that Ctrl-C (KeyboardInterrupt) arrives right after `stage` has
    started writing its checkpoint of step `at` asynchronously: the save is still in flight."""
    from absl import app

    from var_jax import checkpoint

    save = checkpoint.Checkpointer.save

    def interrupted_save(self, step, state, force=False):
        out = save(self, step, state, force)
        if step == at and os.path.basename(os.path.dirname(self.directory)) == stage:
            raise KeyboardInterrupt
        return out

    checkpoint.Checkpointer.save = interrupted_save
    sys.argv = [os.path.join(REPO, 'main.py')] + argv
    import main as main_module

    app.run(main_module.main, flags_parser=main_module.parse_flags)


if __name__ == '__main__':
    if sys.argv[1] == 'sharded':
        sharded_steps(sys.argv[2])
    elif sys.argv[1] == 'main_paused':
        main_paused(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    elif sys.argv[1] == 'main_interrupted':
        main_interrupted(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        raise SystemExit(f'usage: {sys.argv[0]} sharded OUT_DIR | main_paused STAGE STEP MAIN_FLAGS...')
