"""The batched teacher-forcing input (all scales at once) equals the scale-by-scale definition.

`idx_to_var_input` stacks every scale's code map, resizes them with one batched matmul per direction, runs
one conv per phi and takes a cumulative sum. The reference here is the definition, written with the per-scale
path the sampler uses: f_hat after scale k (`idx_to_fhat(cumulative=True)`), area-downsampled to scale k+1.
The golden fixture (tests/test_parity.py) covers one schedule; this covers the phi sharings and schedules
that change the stacking: one phi per scale, one shared phi, no phi, and the 512-px schedule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.models.quantizer import MultiScaleQuantizer
from var_jax.models.resize import resize
from var_jax.models.var import PATCH_NUMS_256, PATCH_NUMS_512


def reference(q, params, idx):
    fhats = q.apply({'params': params}, idx[:-1], method=lambda m, i: m.idx_to_fhat(i, cumulative=True))
    B, pns = idx[0].shape[0], q.patch_nums
    return jnp.concatenate([resize(f, (p, p), 'area').reshape(B, p * p, -1) for f, p in zip(fhats, pns[1:])], axis=1)


@pytest.mark.parametrize(
    'pns,share,resi',
    [
        (PATCH_NUMS_256, 4, 0.5),
        (PATCH_NUMS_256, 0, 0.5),
        (PATCH_NUMS_256, 1, -0.3),
        (PATCH_NUMS_256, 4, 0.0),
        (PATCH_NUMS_512, 4, 0.5),
    ],
)
def test_batched_var_input_equals_the_per_scale_definition(pns, share, resi):
    q = MultiScaleQuantizer(vocab_size=64, cvae=8, patch_nums=pns, quant_resi=resi, share_quant_resi=share)
    keys = jax.random.split(jax.random.PRNGKey(1), len(pns))
    idx = [jax.random.randint(k, (2, p * p), 0, 64) for k, p in zip(keys, pns)]
    var_input = lambda p, i: q.apply({'params': p}, i, method=MultiScaleQuantizer.idx_to_var_input)
    params = q.init(jax.random.PRNGKey(0), idx, method=MultiScaleQuantizer.idx_to_var_input)['params']
    got = jax.jit(var_input)(params, idx)
    want = jax.jit(lambda p, i: reference(q, p, i))(params, idx)
    assert got.shape == (2, sum(p * p for p in pns[1:]), 8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
