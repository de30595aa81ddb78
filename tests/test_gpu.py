"""Checks that need an NVIDIA GPU, skipped elsewhere (`benchmarks/gpu_check.sh` runs them on a lent device):
cuDNN's fused attention, which cannot even be traced without a GPU, against the float64 reference and
XLA's gradients, alone and inside the golden model; the golden model's float32 logits on the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.models import attention

from attention_reference import SIZES, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs an NVIDIA GPU (cuDNN attention)'),
]


@pytest.fixture(scope='module')
def qkv_bf16():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return tuple(jax.random.normal(k, (2, 2, sum(SIZES), 64), jnp.bfloat16) for k in keys)


def test_auto_is_cudnn_for_bf16_on_this_gpu():
    assert attention.resolve('auto', jnp.bfloat16) == 'cudnn'
    assert attention.resolve('auto', jnp.float32) == 'xla'


def test_cudnn_matches_reference(qkv_bf16):
    out = jax.jit(lambda q, k, v: attention.attend(q, k, v, sizes=SIZES, scale=0.3, implementation='cudnn'))(*qkv_bf16)
    assert out.dtype == jnp.bfloat16
    # bf16 output: one rounding of values of size ~1 is ~4e-3; cuDNN's bf16 probabilities add a little.
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(*qkv_bf16, SIZES, 0.3), atol=3e-2, rtol=0)


def test_cudnn_gradients_match_xla(qkv_bf16):
    w = jax.random.normal(jax.random.PRNGKey(1), qkv_bf16[0].shape, jnp.float32)

    def grads(impl):
        f = lambda q, k, v: jnp.sum(
            attention.attend(q, k, v, sizes=SIZES, scale=0.3, implementation=impl).astype(jnp.float32) * w
        )
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*qkv_bf16)

    for a, b, name in zip(grads('xla'), grads('cudnn'), 'qkv'):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(b - a).max() <= 3e-2 * np.abs(a).max(), f'd{name}'


def test_golden_var_in_bf16_with_cudnn_equals_xla(golden, tiny):
    """The converted official model in bf16: cuDNN attention gives XLA's logits and gradients (bf16 rounding)."""
    _, _, var, tp = tiny
    x, labels, targets = golden['var_io/x_BLCv_wo_first_l'], golden['var_io/label_B'], golden['vae_io/idx_BL']

    def loss_and_grad(model):
        def loss(p):
            logits = model.apply({'params': p}, labels, x).astype(jnp.float32)
            return jax.nn.logsumexp(logits, -1).mean() - jnp.take_along_axis(
                logits, targets[..., None], -1
            ).mean(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(tp)

    (_, logits_xla), g_xla = loss_and_grad(var.clone(dtype=jnp.bfloat16, attention='xla'))
    (_, logits_cudnn), g_cudnn = loss_and_grad(var.clone(dtype=jnp.bfloat16, attention='cudnn'))
    scale = np.abs(golden['var_io/logits_BLV']).max()
    np.testing.assert_allclose(logits_cudnn, logits_xla, atol=2e-2 * scale, rtol=0)
    np.testing.assert_allclose(logits_xla, golden['var_io/logits_BLV'], atol=5e-2 * scale, rtol=0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_xla), jax.tree.leaves(g_cudnn)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(b - a).max() <= 5e-2 * np.abs(a).max() + 1e-6, jax.tree_util.keystr(path)


def test_golden_var_float32_logits_on_gpu(golden, tiny):
    """float32 on the GPU (XLA attention, full-precision matmuls as conftest sets): the official logits."""
    _, _, var, tp = tiny
    logits = jax.jit(lambda p: var.apply({'params': p}, golden['var_io/label_B'], golden['var_io/x_BLCv_wo_first_l']))(
        tp
    )
    np.testing.assert_allclose(logits, golden['var_io/logits_BLV'], atol=1e-4, rtol=0)
