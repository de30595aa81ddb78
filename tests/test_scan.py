"""The blocks as one scan over stacked params: every way of running them (scan or unrolled, each remat
policy) gives the official logits and gradients; the layout converts to and from the official per-block
one; the program does not grow with depth; remat trades memory as it says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import convert
from var_jax.models.stacking import BLOCKS, stack_blocks, unstack_blocks
from var_jax.models.var import VAR

from conftest import golden_state_dict

SMALL = dict(vocab_size=32, cvae=8, num_classes=10, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4), attention='xla')


@pytest.mark.parametrize(
    'scan,remat',
    [(True, 'none'), (False, 'none'), (True, 'dots'), (True, 'dots_except_fc1'), (True, 'full'), (False, 'full')],
)
def test_every_way_to_run_the_blocks_gives_the_official_loss_and_gradients(golden, tiny, scan, remat):
    _, _, var, tp = tiny
    model = var.clone(scan=scan, remat=remat)
    x, labels, targets = golden['var_io/x_BLCv_wo_first_l'], golden['var_io/label_B'], golden['vae_io/idx_BL']

    def loss_fn(params):
        logits = model.apply({'params': params}, labels, x)
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return ce.mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(tp)
    np.testing.assert_allclose(logits, golden['var_io/logits_BLV'], atol=1e-4, rtol=0)
    np.testing.assert_allclose(loss, golden['train/loss'], rtol=1e-4)
    ref = convert.state_dict_to_params(
        golden_state_dict(golden, 'train/grad/'), jax.eval_shape(lambda: tp), convert._VAR_BUFFERS
    )
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = flat_ref[path]
        assert np.abs(np.asarray(g) - r).max() <= 1e-4 * np.abs(r).max() + 1e-8, jax.tree_util.keystr(path)


def test_params_are_stacked_and_convert_to_and_from_the_official_layout(tiny):
    _, _, var, tp = tiny
    assert tp[BLOCKS]['attn']['mat_qkv']['kernel'].shape == (var.depth, var.embed_dim, 3 * var.embed_dim)
    assert not any(k.startswith(f'{BLOCKS}_') for k in tp)
    per_block = unstack_blocks(jax.device_get(tp))
    assert BLOCKS not in per_block and sorted(k for k in per_block if k.startswith(BLOCKS)) == ['blocks_0', 'blocks_1']
    np.testing.assert_array_equal(per_block['blocks_1']['ffn']['fc1']['kernel'], tp[BLOCKS]['ffn']['fc1']['kernel'][1])
    back = stack_blocks(per_block)  # also how params written with per-block names load
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(jax.device_get(tp))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match='blocks_0'):
        stack_blocks({'blocks_0': {}, 'blocks_2': {}})


def _lowered_lines(depth, scan):
    """Lines of the lowered program of a VAR gradient (every op is a line)."""
    model = VAR(depth=depth, scan=scan, **SMALL)
    x, labels = jnp.zeros((2, 29, 8)), jnp.zeros((2,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), labels, x))['params']
    grad = jax.grad(lambda p: model.apply({'params': p}, labels, x).sum())
    return len(jax.jit(grad).lower(params).as_text().splitlines())


def test_the_scanned_program_does_not_grow_with_depth():
    assert _lowered_lines(2, scan=True) == _lowered_lines(6, scan=True)
    assert _lowered_lines(6, scan=False) > _lowered_lines(2, scan=False) + 500  # the unrolled one does
    # The default (None) scans for accelerators and unrolls on CPU, where the unrolled blocks run faster.
    from var_jax.models.platform import compile_target

    with compile_target('tpu'):
        assert _lowered_lines(2, scan=None) == _lowered_lines(6, scan=None)
    assert _lowered_lines(6, scan=None) == _lowered_lines(6, scan=False)


def test_remat_keeps_less_for_the_backward_pass():
    def temp_bytes(remat, width=SMALL['embed_dim'], depth=2):
        model = VAR(depth=depth, remat=remat, scan=True, **dict(SMALL, embed_dim=width))
        x, labels = jnp.zeros((64, 29, 8)), jnp.zeros((64,), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), labels[:1], x[:1])['params']  # shapes suffice
        grad = jax.grad(lambda p: model.apply({'params': p}, labels, x).sum())
        return jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes

    none, dots, full = temp_bytes('none'), temp_bytes('dots'), temp_bytes('full')
    # (Which of dots / full keeps less depends on the shapes: at this width both keep about the same.)
    assert none > 1.5 * max(dots, full), (none, dots, full)
    # Where the MLP's 4C-wide hidden is the largest thing kept (wider than these 29 tokens' attention) and
    # the blocks' kept activations outweigh one block's recomputed ones (depth 8), not keeping it saves memory.
    wide_dots, wide_lean = temp_bytes('dots', 512, 8), temp_bytes('dots_except_fc1', 512, 8)
    assert wide_lean < 0.9 * wide_dots, (wide_lean, wide_dots)
    with pytest.raises(ValueError, match='remat='):
        VAR(depth=2, remat='some', **SMALL).init(
            jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 29, 8))
        )
