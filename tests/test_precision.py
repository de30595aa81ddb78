"""Explicit matmul precision in the tokenizer: its token ids survive an accelerator's DEFAULT precision.

On TPU a float32 conv / dot at DEFAULT precision is one bfloat16 MXU pass (TF32 on recent GPUs); XLA:CPU
ignores the precision. So the TPU policy is emulated on CPU: the encode program is traced, and every
conv_general_dilated / dot_general primitive whose precision is DEFAULT gets both operands rounded to
bfloat16 before an exact float32 product, as the MXU does; HIGH / HIGHEST ones stay exact.
"""

import collections
import re

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import checkpoint
from var_jax.models.vqvae import VQVAE

P = jax.lax.Precision
_MATMULS = ('conv_general_dilated', 'dot_general')


def _tpu_operands(operands, precision, seen):
    """Operands as a TPU multiplies them: bfloat16-rounded where the operand's precision is DEFAULT."""
    per_operand = (None, None) if precision is None else precision
    if not (isinstance(per_operand, tuple) and all(p is None or isinstance(p, P) for p in per_operand)):
        raise NotImplementedError(f'precision {precision!r}: the emulation knows only lax.Precision values')
    rounded = [p in (None, P.DEFAULT) and x.dtype == jnp.float32 for p, x in zip(per_operand, operands)]
    seen['bf16 pass' if any(rounded) else 'float32'] += 1
    return [x.astype(jnp.bfloat16).astype(jnp.float32) if r else x for r, x in zip(rounded, operands)]


def _has_matmul(params) -> bool:
    return any(
        e.primitive.name in _MATMULS or _has_matmul(e.params) for j in jcore.jaxprs_in_params(params) for e in j.eqns
    )


def _eval(jaxpr, consts, args, seen):
    """Evaluates a jaxpr with the TPU policy on its convs and dots, inlining nested jits."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        x = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in ('jit', 'pjit'):
            sub = eqn.params['jaxpr']
            out = _eval(sub.jaxpr, sub.consts, x, seen)
        elif name in _MATMULS:
            x = _tpu_operands(x, eqn.params['precision'], seen)
            out = eqn.primitive.bind(*x, **dict(eqn.params, precision=(P.HIGHEST, P.HIGHEST)))
        else:
            assert not _has_matmul(eqn.params), f'{name} holds a conv/dot the emulation would not see'
            out = eqn.primitive.bind(*x, **eqn.primitive.get_bind_params(eqn.params))
        env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]))
    return [read(v) for v in jaxpr.outvars]


def on_emulated_tpu(fn, *args):
    """(fn(*args) as a TPU computes it when no precision is set anywhere, {'bf16 pass': n, 'float32': m})."""
    # conftest sets jax_default_matmul_precision='highest' for the parity tests; a TPU user has no such setting.
    with jax.default_matmul_precision('default'):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    seen = collections.Counter()
    out = jax.jit(lambda *flat: _eval(closed.jaxpr, closed.consts, flat, seen))(*jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), out), dict(seen)


def test_the_emulation_rounds_default_operands_to_bfloat16_only():
    """The emulator itself: DEFAULT products are those of bfloat16-rounded operands, HIGHEST ones exact."""
    a, b = np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32)
    exact = a.astype(np.float64) @ b
    rounded = np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) @ np.asarray(jnp.asarray(b, jnp.bfloat16))
    assert np.abs(rounded - exact).max() > 1e-3  # so the two cases below are told apart
    for precision, want, counted in ((None, rounded, 'bf16 pass'), ('highest', exact, 'float32')):
        got, seen = on_emulated_tpu(lambda x, y: jnp.dot(x, y, precision=precision), a, b)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert seen == {counted: 1}


def _encode(vqvae):
    return lambda p, img: vqvae.apply({'params': p}, img, method=VQVAE.img_to_idx)


@pytest.fixture(scope='module')
def images(golden):
    return golden['vae_io/img_B3HW'].transpose(0, 2, 3, 1)


@pytest.fixture(scope='module')
def golden_idx(golden):
    return [golden[f'vae_io/idx_Bl/{si:02d}'] for si in range(4)]


def test_token_ids_survive_a_tpu_default_precision_policy(tiny, images, golden_idx):
    """The default config (encode_precision='highest') encodes the golden images to the official ids."""
    vqvae, vp, _, _ = tiny
    assert vqvae.encode_precision == 'highest'
    idx, seen = on_emulated_tpu(_encode(vqvae), vp, images)
    assert seen == {'float32': 32 + 22}  # 32 convs, 22 dots (attention, resizes, nearest code): none rounded
    for si, (got, want) in enumerate(zip(idx, golden_idx)):
        np.testing.assert_array_equal(got, want, err_msg=f'scale {si}')


def test_default_precision_changes_token_ids_under_the_same_policy(tiny, images, golden_idx):
    """What the test above guards against: at 'default' the bf16 passes flip nearest codes."""
    vqvae, vp, _, _ = tiny
    idx, seen = on_emulated_tpu(_encode(vqvae.clone(encode_precision='default')), vp, images)
    assert seen == {'bf16 pass': 32 + 22}
    flipped = [int((got != want).sum()) for got, want in zip(idx, golden_idx)]
    assert sum(flipped) >= 1, f'no token id changed under bf16 passes (per scale: {flipped})'


_OP = re.compile(r'stablehlo\.(convolution|dot_general|dot)\b')


def op_precisions(stablehlo: str) -> list:
    """[(op, [operand precisions])] of every convolution / dot in StableHLO text; [] where none is given."""
    out = []
    for line in stablehlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        if m.group(1) == 'convolution':  # precision_config = [#stablehlo<precision HIGHEST>, ...]
            p = re.search(r'precision_config = \[([^\]]*)\]', line)
            out.append((m.group(1), re.findall(r'precision (\w+)>', p.group(1)) if p else []))
        else:  # precision = [HIGHEST, HIGHEST]
            p = re.search(r'precision = \[([^\]]*)\]', line)
            out.append((m.group(1), [s.strip() for s in p.group(1).split(',')] if p else []))
    return out


def _lowered_ops(fn, *args):
    with jax.default_matmul_precision('default'):  # an unset precision must show up as DEFAULT
        return op_precisions(jax.jit(fn).lower(*args).as_text())


def _encoding_programs(vqvae, vp, images):
    """The programs that make token ids or read the quantizer: tokenise, teacher-forcing input, VQ loss grad."""
    f = jax.eval_shape(lambda p, x: vqvae.apply({'params': p}, x, method=VQVAE.img_to_f), vp, images)
    idx = jax.eval_shape(_encode(vqvae), vp, images)  # lowering needs only shapes

    def vq_loss(p, img):
        return vqvae.apply({'params': p}, img, method=lambda m, x: m.quantize(m.img_to_f(x))[1])

    return {
        'img_to_idx': (_encode(vqvae), vp, images),
        'idx_to_var_input': (lambda p, i: vqvae.apply({'params': p}, i, method=VQVAE.idx_to_var_input), vp, idx),
        'f_to_idx': (lambda p, f: vqvae.apply({'params': p}, f, method=lambda m, f: m.quantize.f_to_idx(f)), vp, f),
        'grad of the VQ loss': (jax.grad(vq_loss), vp, images),
    }


def test_encoding_lowers_with_highest_precision_only(tiny, images):
    """Every conv and dot of the encoding programs carries HIGHEST: a new one without precision fails here."""
    vqvae, vp, _, _ = tiny
    for name, (fn, *args) in _encoding_programs(vqvae, vp, images).items():
        ops = _lowered_ops(fn, *args)
        assert {op for op, _ in ops} == {'convolution', 'dot_general'}, (name, ops)
        loose = [(op, p) for op, p in ops if p != ['HIGHEST', 'HIGHEST']]
        assert not loose, f'{name}: {len(loose)} of {len(ops)} convs/dots without HIGHEST precision: {loose[:3]}'


def test_the_lowering_check_sees_a_missing_precision(tiny, images):
    """The check above fails for a tokenizer whose encoder leaves precision unset."""
    vqvae, vp, _, _ = tiny
    ops = _lowered_ops(_encode(vqvae.clone(encode_precision='default')), vp, images)
    assert ops and all(p == ['DEFAULT', 'DEFAULT'] for _, p in ops)
    assert ['HIGH', 'HIGH'] in [p for _, p in _lowered_ops(_encode(vqvae.clone(encode_precision='high')), vp, images)]


@pytest.mark.parametrize('decode_precision', ['default', 'highest'])
def test_decode_precision_governs_the_decoder(tiny, decode_precision):
    """post_quant_conv and the decoder (convs and attention) follow decode_precision, not encode_precision."""
    vqvae, vp, _, _ = tiny
    vqvae = vqvae.clone(decode_precision=decode_precision)
    f_hat = jnp.zeros((1, 8, 8, vqvae.z_channels))
    ops = _lowered_ops(lambda p, f: vqvae.apply({'params': p}, f, method=VQVAE.fhat_to_img), vp, f_hat)
    assert {op for op, _ in ops} == {'convolution', 'dot_general'}
    assert all(p == [decode_precision.upper()] * 2 for _, p in ops), ops


def test_bfloat16_decode_computes_in_bfloat16_and_returns_float32_images(tiny, golden):
    """decode_dtype='bfloat16': every conv and matmul of post_quant_conv and the decoder takes bf16 operands, the
    images come out float32 and close to the float32 decode of the golden f_hat; token ids are untouched."""
    vqvae, vp, _, _ = tiny
    f_hat = jnp.asarray(golden['vae_io/fhat_BChw'].transpose(0, 2, 3, 1))
    decode = lambda m: jax.jit(lambda p, f: m.apply({'params': p}, f, method=VQVAE.fhat_to_img))
    low = vqvae.clone(decode_dtype='bfloat16')
    text = jax.jit(lambda p, f: low.apply({'params': p}, f, method=VQVAE.fhat_to_img)).lower(vp, f_hat).as_text()
    ops = [ln for ln in text.splitlines() if 'stablehlo.convolution' in ln or 'stablehlo.dot_general' in ln]
    operands = [ln.rsplit(' : ', 1)[1].split(') -> ')[0] for ln in ops]  # '(tensor<..xbf16>, tensor<..xbf16>'
    assert operands and all('bf16' in x and 'f32' not in x for x in operands), operands
    a, b = decode(vqvae)(vp, f_hat), decode(low)(vp, f_hat)
    assert b.dtype == jnp.float32
    err = np.abs(np.asarray(b) - np.asarray(a))
    assert 0 < err.mean() < 0.01 and err.max() < 0.2, (err.mean(), err.max())  # images in [-1, 1]
    with pytest.raises(ValueError, match="decode_dtype='float16'"):
        jax.eval_shape(vqvae.clone(decode_dtype='float16').init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_bad_precision_names_the_field():
    with pytest.raises(ValueError, match="encode_precision='float32' is not a matmul precision"):
        jax.eval_shape(
            VQVAE(ch=32, ch_mult=(1, 2), patch_nums=(1, 2), encode_precision='float32').init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, 4, 4, 3)),
        )


def test_precision_is_a_compute_choice_of_params_files(tiny):
    """A params file fits a model that differs only in precision; model.json files without the fields load."""
    vqvae = tiny[0]
    # as load_model_config returns a model.json: lists back to tuples
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint.model_config(vqvae).items()}
    assert saved['encode_precision'] == 'highest' and saved['decode_precision'] == 'default'
    checkpoint.check_model_config('vae', saved, vqvae.clone(encode_precision='default', decode_precision='highest'))
    with pytest.raises(ValueError, match='vocab_size'):
        checkpoint.check_model_config('vae', saved, vqvae.clone(vocab_size=32))
    old = {k: v for k, v in saved.items() if not k.endswith('_precision')}  # a model.json written before
    assert VQVAE(**old) == vqvae
