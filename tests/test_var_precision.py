"""var.precision with bfloat16 blocks: 'official' (float32 residual stream, AdaLN modulation and training logits,
as under the official fp16 autocast) against 'lean' (all in bfloat16), on the golden fixture's teacher forcing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.trainers import transformer


@pytest.fixture(scope='module')
def runs(golden, tiny):
    """{precision: (logits, loss)} of the golden VAR's forward in eval mode; 'float32' is the reference."""
    _, _, var, params = tiny
    labels, x, targets = golden['var_io/label_B'], golden['var_io/x_BLCv_wo_first_l'], golden['vae_io/idx_BL']
    weights = np.full(targets.shape[1], 1 / targets.shape[1], np.float32)
    out = {}
    for name, model in (
        ('float32', var),
        ('official', var.clone(dtype=jnp.bfloat16, precision='official')),
        ('lean', var.clone(dtype=jnp.bfloat16, precision='lean')),
    ):
        logits = jax.jit(lambda p, m=model: m.apply({'params': p}, labels, x))(params)
        loss, _ = jax.jit(lambda p, m=model: transformer.var_loss(m, p, labels, x, targets, weights))(params)
        out[name] = (logits, float(loss))
    return out


def test_official_precision_returns_float32_training_logits_lean_bfloat16(runs):
    assert runs['float32'][0].dtype == jnp.float32
    assert runs['official'][0].dtype == jnp.float32 and runs['lean'][0].dtype == jnp.bfloat16


def test_official_precision_is_closer_to_float32_than_lean(runs):
    ref, ref_loss = runs['float32']
    rms = {k: float(np.sqrt(np.mean((np.asarray(runs[k][0], np.float32) - ref) ** 2))) for k in ('official', 'lean')}
    loss_err = {k: abs(runs[k][1] - ref_loss) for k in ('official', 'lean')}
    assert 0 < rms['official'] < rms['lean'], rms  # both round (bf16 matmuls); lean rounds more
    assert loss_err['official'] < 1e-2 and loss_err['lean'] < 1e-2, loss_err
    print(f'logit rms vs float32: {rms}; |loss - float32 loss|: {loss_err}')


def test_a_bad_precision_is_named(tiny):
    _, _, var, params = tiny
    with pytest.raises(ValueError, match="var.precision='fp16'"):
        var.clone(precision='fp16').init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 84, 8)))
