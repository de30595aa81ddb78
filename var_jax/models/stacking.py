"""The VAR's `depth` transformer blocks as one module with stacked params, and the layouts around it.

Every block param has a leading depth axis under 'blocks' (`BLOCKS`), so `nn.scan` compiles one block whatever
the depth (or unrolls the same params on CPU). `remat` picks what the backward pass recomputes per block. The
official state dicts and params files written before stacking hold one subtree per block ('blocks_0', ...):
`stack_blocks` / `unstack_blocks` convert between the two.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = 'blocks'  # the stacked params of all blocks: {BLOCKS: {...: (depth, ...)}}
REMAT_POLICIES = ('none', 'dots', 'dots_except_fc1', 'full')


def remat_policy(remat: str, fc1_kernel_shape=None):
    """jax.checkpoint policy of `remat`; 'dots_except_fc1' needs fc1's kernel shape (C, hidden)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f'remat={remat!r} is not one of {REMAT_POLICIES} (none: keep every activation; '
            f'dots: keep the matmul outputs, recompute the rest; dots_except_fc1: the same but also '
            f'recompute the MLP hidden; full: recompute the block)'
        )
    dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if remat == 'dots_except_fc1':
        if fc1_kernel_shape is None:  # without it the policy would silently be 'dots'
            raise ValueError("remat='dots_except_fc1' needs fc1's kernel shape (C, hidden)")
        # fc1 is the one matmul of a block with a (C, hidden) kernel (qkv's and proj's are reshaped to
        # head-major, ada_lin's is (C, 6C), fc2's (hidden, C)). Its output, the widest activation of the block,
        # is recomputed: one more matmul per block. (Saving every other matmul by checkpoint_name instead
        # was slower in XLA's estimate of the d16 step, for the same memory.)
        return lambda prim, *avals, **params: (
            not (len(avals) == 2 and avals[1].shape == fc1_kernel_shape) and dots(prim, *avals, **params)
        )
    return {'none': None, 'dots': dots, 'full': None}[remat]


def stacked_blocks(block, depth: int, scan: bool, remat: str, fc1_kernel_shape=None):
    """The `depth` blocks as one module with stacked params: nn.scan over `block`, rematerialised per
    block when remat != 'none'; scan=False unrolls the loop (same params, one copy of the block per layer
    in the program)."""
    if remat != 'none':
        # static: train and sizes (self is argument 0). In a rolled scan CSE cannot undo the remat.
        block = nn.remat(
            block, policy=remat_policy(remat, fc1_kernel_shape), prevent_cse=not scan, static_argnums=(5, 6)
        )
    return nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=depth,
        unroll=1 if scan else depth,
    )


def unstack_blocks(params) -> dict:
    """{'blocks': {... (depth, ...)}} -> {'blocks_0': {...}, 'blocks_1': ...}: the per-block layout of the
    official state dicts. Works on arrays and on jax.ShapeDtypeStruct trees."""
    params = dict(params)
    stacked = params.pop(BLOCKS)
    depth = jax.tree.leaves(stacked)[0].shape[0]

    def pick(i):
        return lambda t: jax.ShapeDtypeStruct(t.shape[1:], t.dtype) if isinstance(t, jax.ShapeDtypeStruct) else t[i]

    for i in range(depth):
        params[f'{BLOCKS}_{i}'] = jax.tree.map(pick(i), stacked)
    return params


def stack_blocks(params) -> dict:
    """{'blocks_0': {...}, 'blocks_1': ...} -> {'blocks': {... (depth, ...)}}, the layout VAR uses (and
    params written before blocks were stacked load through it). NumPy in, NumPy out."""
    params = dict(params)
    names = sorted((k for k in params if k.startswith(f'{BLOCKS}_')), key=lambda k: int(k.rsplit('_', 1)[1]))
    if [int(k.rsplit('_', 1)[1]) for k in names] != list(range(len(names))):
        raise ValueError(f'per-block params must be {BLOCKS}_0 ... {BLOCKS}_<depth-1>, got {names}')
    blocks = [params.pop(k) for k in names]
    stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(blocks)) else jnp.stack
    params[BLOCKS] = jax.tree.map(lambda *xs: stack(xs), *blocks)
    return params
