"""Tests of var_jax.sampling: golden greedy samples, cached vs teacher-forced logits, no
retracing, top-k / top-p / temperature distributions, zero-shot editing, input validation.

Compiles are the slow part on CPU, so the tests share a few static configurations:
greedy (top_k=1, logits), teacher forcing / editing (top_k=0, logits) and smoothing.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import draws, sample_batches, sampling
from var_jax.convert import convert_vae, convert_var
from var_jax.models import attention as attn_lib
from var_jax.models.platform import compile_target
from var_jax.models.resize import resize
from var_jax.models.var import VAR, begin_ends
from var_jax.models.vqvae import VQVAE

DATA = 'tests/data/tiny_public.npz'
PN = (1, 2, 4, 8)


def _nchw_to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope='module', autouse=True)
def highest_precision():
    """Float32 matmuls for parity with the float32 torch run, for this module only."""
    with jax.default_matmul_precision('highest'):
        yield


@pytest.fixture(scope='module')
def tiny():
    z = np.load(DATA)
    vcfg, vae_params = convert_vae({k[4:]: z[k] for k in z.files if k.startswith('vae/')}, PN)
    tcfg, var_params = convert_var({k[4:]: z[k] for k in z.files if k.startswith('var/')}, PN)
    return types.SimpleNamespace(
        z=z,
        vae=VQVAE(**vcfg),
        vp=vae_params,
        var=VAR(**tcfg),
        tp=var_params,
        image=_nchw_to_nhwc(z['vae_io/img_B3HW']),
        src_idx=[z[f'vae_io/idx_Bl/{si:02d}'] for si in range(len(PN))],
    )


def _models(t):
    return t.vae, t.vp, t.var, t.tp


@pytest.fixture(scope='module')
def forward(tiny):
    """The full teacher-forced forward, jitted once for the module's (2, L - 1, Cvae) inputs."""
    return jax.jit(lambda labels, x: tiny.var.apply({'params': tiny.tp}, labels, x))


# ------------------------------------------------------------------------------------------------
# Golden parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('g, attention', [(1, 'auto'), (3, 'auto'), (3, 'splash')])
def test_greedy_sampling_matches_official(tiny, g, attention, monkeypatch):
    """attention='splash' runs the TPU sampler's path: the Pallas kernel (interpret mode on CPU) on
    sequence-minor q, k, v and KV cache."""
    if attention == 'splash':  # a model of its own: its compiled sampler is cached apart from the others
        monkeypatch.setattr(attn_lib, 'sequence_minor', lambda: True)
    z = tiny.z
    vae, vp, var, tp = _models(tiny)
    res = sampling.sample(
        vae,
        vp,
        var.clone(attention=attention),
        tp,
        z[f'sample/cfg{g}/label_B'],
        jax.random.PRNGKey(g),
        cfg=float(z[f'sample/cfg{g}/cfg']),
        top_k=1,
        return_logits=True,
    )
    for si in range(len(PN)):
        np.testing.assert_array_equal(np.asarray(res['idx'][si]), z[f'sample/cfg{g}/idx_Bl/{si:02d}'])
        np.testing.assert_allclose(
            np.asarray(res['logits'][si]), z[f'sample/cfg{g}/logits_BlV/{si:02d}'], atol=1e-4, rtol=0
        )
    np.testing.assert_allclose(np.asarray(res['f_hat']), _nchw_to_nhwc(z[f'sample/cfg{g}/fhat_BChw']), atol=1e-4)
    np.testing.assert_allclose(np.asarray(res['images']), _nchw_to_nhwc(z[f'sample/cfg{g}/img_B3HW']), atol=1e-4)
    assert res['images'].dtype == jnp.float32


def test_cached_loop_equals_teacher_forced_forward(tiny, forward):
    vae, vp, var, tp = _models(tiny)
    labels = tiny.z['var_io/label_B']
    res = sampling.teacher_forced(vae, vp, var, tp, labels, tiny.src_idx)
    idx = [jnp.asarray(i) for i in tiny.src_idx]
    x = jax.jit(lambda p, idx: vae.apply({'params': p}, idx, method=VQVAE.idx_to_var_input))(vp, idx)
    full = np.asarray(forward(jnp.asarray(labels), x))
    for si, (b, e) in enumerate(begin_ends(PN)):
        np.testing.assert_allclose(np.asarray(res['logits'][si]), full[:, b:e], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(res['idx'][si]), tiny.src_idx[si])
    fhat = vae.apply({'params': vp}, idx, method=lambda m, idx: m.quantize.idx_to_fhat(idx))
    np.testing.assert_allclose(np.asarray(res['f_hat']), np.asarray(fhat), atol=1e-5)


def test_step_refuses_a_cache_of_other_scales(tiny):
    """The cache grows scale by scale: a step given the cache of other scales says so instead of misreading it."""
    var, C = tiny.var, tiny.var.embed_dim
    x, cond = jnp.zeros((2, PN[1] ** 2, C)), jnp.zeros((2, C))
    with pytest.raises(ValueError, match='scale 1 needs the cache of the 1 tokens before it, got 0'):
        var.apply({'params': tiny.tp}, method=lambda m: m.step(1, x, cond, m.init_cache(2)))


def test_new_labels_key_and_cfg_do_not_retrace(tiny):
    models = _models(tiny)
    kw = dict(top_k=1, return_logits=True)  # the greedy tests' configuration
    a = sampling.sample(*models, np.array([1, 2]), jax.random.PRNGKey(0), cfg=1.0, **kw)
    traces = sampling._TRACES[0]
    b = sampling.sample(*models, np.array([7, 0]), jax.random.PRNGKey(5), cfg=2.25, **kw)
    c = sampling.sample(*models, None, 11, cfg=0.5, batch_size=2, **kw)  # random labels, int seed
    jax.block_until_ready((b, c))
    assert sampling._TRACES[0] == traces
    assert not np.array_equal(np.asarray(a['idx'][-1]), np.asarray(b['idx'][-1]))
    assert c['labels'].shape == (2,) and 0 <= int(c['labels'].min()) and int(c['labels'].max()) < 10


def test_more_smooth_uses_gumbel_soft_embeddings(tiny, forward):
    """The smoothed f_hat and every scale's logits against a float64 NumPy re-derivation of the official code.

    Official (`autoregressive_infer_cfg`, more_smooth=True): gum_t = max(0.27 * (1 - ratio * 0.95), 0.005) and
    h = gumbel_softmax_with_rng(masked_logits * (1 + ratio), tau=gum_t, hard=False) @ embedding, with
    gumbels = -log(Exp(1)) = -log(-log(u)); the next scale's logits see the f_hat built from these h.
    Only the uniforms u come from the sampler (its documented per-scale key split); the rest is recomputed here.
    """
    vae, vp, var, tp = _models(tiny)
    key, labels, cfg, k = jax.random.PRNGKey(3), np.array([4, 9]), 2.0, 3
    res = sampling.sample(vae, vp, var, tp, labels, key, cfg=cfg, top_k=k, more_smooth=True, return_logits=True)
    codebook = np.asarray(vp['quantize']['embedding'], np.float64)
    K, B, Cv = len(PN), len(labels), codebook.shape[1]
    keys = jax.random.split(key, K)
    f_hat, fhats = 0.0, []
    for si, pn in enumerate(PN):
        ratio = si / (K - 1)
        lg = np.asarray(res['logits'][si], np.float64)
        masked = np.where(lg < np.sort(lg, -1)[..., -k : -k + 1], -np.inf, lg)  # official top-k: < k-th largest out
        assert np.isfinite(np.take_along_axis(masked, np.asarray(res['idx'][si])[..., None], -1)).all()
        u = jax.random.uniform(jax.random.split(keys[si])[1], lg.shape, jnp.float32, np.finfo(np.float32).tiny, 1.0)
        gumbels = -np.log(-np.log(np.asarray(u, np.float64)))
        gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
        y = (masked * (1 + ratio) + gumbels) / gum_t
        y = np.exp(y - y.max(-1, keepdims=True))
        h = (y / y.sum(-1, keepdims=True)) @ codebook  # soft (hard=False) Gumbel-softmax @ embedding
        f_hat = f_hat + vae.apply(
            {'params': vp},
            jnp.asarray(h.reshape(B, pn, pn, Cv), jnp.float32),
            si,
            method=lambda m, h, si: m.quantize.upsample_and_phi(h, si),
        )
        fhats.append(f_hat)
    np.testing.assert_allclose(np.asarray(res['f_hat']), np.asarray(f_hat), atol=1e-4)
    # The logits the sampler used are the model's on that soft f_hat: the full forward of [cond; null] on the
    # area-downsampled running f_hat, guided with t = cfg * ratio.
    x = jnp.concatenate([resize(fhats[si], (PN[si + 1],) * 2, 'area').reshape(B, -1, Cv) for si in range(K - 1)], 1)
    cond = np.asarray(forward(jnp.asarray(labels), x), np.float64)
    uncond = np.asarray(forward(jnp.full_like(labels, var.num_classes), x), np.float64)
    for si, (b, e) in enumerate(begin_ends(PN)):
        t = cfg * si / (K - 1)
        np.testing.assert_allclose(
            np.asarray(res['logits'][si]), (1 + t) * cond[:, b:e] - t * uncond[:, b:e], atol=1e-4, rtol=0
        )


# ------------------------------------------------------------------------------------------------
# top-k / top-p / temperature
# ------------------------------------------------------------------------------------------------
def _official_filter(logits, top_k=0, top_p=0.0, temperature=1.0):
    """NumPy transcription of the official sample_with_top_k_top_p_ masking (plus temperature)."""
    lg = np.asarray(logits, np.float64) / temperature
    lg = np.array(lg)
    if top_k > 0:
        thr = np.sort(lg, -1)[..., -top_k][..., None]
        lg[lg < thr] = -np.inf
    if top_p > 0:
        order = np.argsort(lg, -1, kind='stable')
        srt = np.take_along_axis(lg, order, -1)
        p = np.exp(srt - srt.max(-1, keepdims=True))
        cum = np.cumsum(p / p.sum(-1, keepdims=True), -1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False
        rm = np.zeros_like(remove)
        np.put_along_axis(rm, order, remove, -1)
        lg[rm] = -np.inf
    return lg


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(params=[1, 4], ids=['cpu_search', 'accelerator_search'])
def search_bits(request, monkeypatch):
    """Runs a test with the thresholds searched 1 bit per pass (CPU) and 4 (TPU / GPU): same results."""
    monkeypatch.setitem(draws.SEARCH_BITS, 'cpu', request.param)
    return request.param


@pytest.mark.parametrize('top_k,top_p', [(0, 0.0), (5, 0.0), (0, 0.3), (0, 0.9), (10, 0.5), (64, 1.0)])
def test_filter_matches_official_masks(top_k, top_p, search_bits):
    logits = np.random.default_rng(0).normal(size=(400, 64)).astype(np.float32) * 2
    ours = np.asarray(draws.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    ref = _official_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], logits[np.isfinite(ours)], rtol=1e-6)


def test_filter_keeps_ties(search_bits):
    lg = jnp.array([[3.0, 2.0, 1.0, 1.0, 1.0, 0.0, -1.0, -2.0]])
    assert np.isfinite(np.asarray(draws.filter_logits(lg, top_k=3))).sum() == 5  # every tie of the 3rd
    # top-p: the official code would drop some of the tied 1.0s at the cut; all of them are kept.
    kept = np.isfinite(np.asarray(draws.filter_logits(lg, top_p=0.8)))[0]
    assert kept[:5].all() and not kept[5:].any()


CHI2_CASES = {
    'top_k': (np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0]), dict(top_k=3)),
    'top_k_tie': (np.array([1.0, 2.0, 0.5, 0.5, 0.5, 0.0, -1.0, 0.2]), dict(top_k=3)),
    'top_p': (np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0]), dict(top_p=0.8)),
    'temperature': (np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0]), dict(temperature=2.5)),
    'all': (np.array([0.1, 1.5, -1.0, 0.3, 2.0, -0.5, 1.0, -3.0]), dict(top_k=6, top_p=0.9, temperature=0.7)),
    'none': (np.array([0.1, 1.5, -1.0, 0.3, 2.0, -0.5, 1.0, -3.0]), dict()),
}


@pytest.mark.parametrize('case', sorted(CHI2_CASES))
@pytest.mark.parametrize('platform', ['cpu', 'tpu'])  # inverse CDF / Gumbel-max, 1- / 4-bit threshold searches
def test_sample_distribution_chi_square(case, platform):
    from scipy.stats import chisquare

    logits, kw = CHI2_CASES[case]
    n = 40000
    expected = _softmax(_official_filter(logits[None], **kw))[0]
    draw = jax.jit(lambda key, lg: draws.sample_logits(key, lg, **kw)[0])
    with compile_target(platform):  # traced for that platform, run here
        idx = np.asarray(draw(jax.random.PRNGKey(123), jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, 8))))
    counts = np.bincount(idx, minlength=8)
    support = expected > 0
    assert counts[~support].sum() == 0, f'filtered tokens were drawn: {counts}'
    assert support.sum() >= 3
    p = chisquare(counts[support], n * expected[support]).pvalue
    assert p > 1e-3, f'{case}: counts {counts} vs expected {n * expected} (p={p:.2e})'


# ------------------------------------------------------------------------------------------------
# Zero-shot editing
# ------------------------------------------------------------------------------------------------
def test_rectangle_mask_is_the_official_box():
    m = sampling.rectangle_mask(PN, 0.1, 0.2, 0.8, 0.7, inpainting=False)
    ref = np.zeros((8, 8), np.float32)
    ref[round(0.8) : round(6.4), round(1.6) : round(5.6)] = 1  # rows 1:6, cols 2:6
    np.testing.assert_array_equal(m, ref)
    np.testing.assert_array_equal(sampling.rectangle_mask(PN, 0.1, 0.2, 0.8, 0.7, inpainting=True), 1 - ref)


def test_scale_masks_match_torch_bilinear():
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(0)
    for pns in ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), (1, 2, 3, 4, 6, 8)):
        s = pns[-1]
        boxes = [sampling.rectangle_mask(pns, 0.1, 0.15, 0.8, 0.75, inpainting=i == 0) for i in range(2)]
        masks = np.concatenate([rng.random((6, s, s)) > 0.5, np.stack(boxes)]).astype(np.float32)
        ours = sampling.scale_keep_masks(masks, pns, len(masks))
        for si, pn in enumerate(pns):
            ref = (
                torch.nn.functional.interpolate(
                    torch.from_numpy(masks)[:, None], size=(pn, pn), mode='bilinear', align_corners=False
                )
                .gt(0.5)
                .int()
                .numpy()
                .reshape(len(masks), -1)
            )
            if pn * pn <= 3:
                ref = np.ones_like(ref)
            np.testing.assert_array_equal(np.asarray(ours[si]), ref, err_msg=f'{pns} pn={pn}')


def test_pixel_mask_equals_token_mask_for_boxes():
    m = sampling.rectangle_mask(PN, 0.25, 0.1, 0.6, 0.9, inpainting=True)
    pixel = np.kron(m, np.ones((4, 4), np.float32))  # 32 x 32
    for a, b in zip(sampling.scale_keep_masks(m, PN, 2), sampling.scale_keep_masks(pixel, PN, 2, 32)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope='module')
def inpaint(tiny):
    mask = sampling.rectangle_mask(PN, 0.25, 0.25, 0.75, 0.75, inpainting=True)
    res = sampling.edit(*_models(tiny), tiny.image, mask, None, jax.random.PRNGKey(1), cfg=3.0, return_logits=True)
    return mask, res


def test_edit_keeps_source_tokens(tiny, inpaint):
    mask, res = inpaint
    vae, vp = tiny.vae, tiny.vp
    for si, src in enumerate(tiny.src_idx):
        np.testing.assert_array_equal(np.asarray(res['src_idx'][si]), src)  # the encoder agrees with torch
    keep = sampling.scale_keep_masks(mask, PN, 2)
    assert np.asarray(keep[0]).all()
    changed = 0
    for si, src in enumerate(tiny.src_idx):
        k = np.asarray(keep[si]) > 0.5
        idx = np.asarray(res['idx'][si])
        np.testing.assert_array_equal(idx[k], src[k])
        changed += (idx[~k] != src[~k]).sum()
    assert changed > 0, 'nothing was regenerated'
    assert (np.asarray(keep[-1]) == np.broadcast_to(mask.reshape(1, -1), (2, 64))).all()
    # The embeddings that built f_hat are exactly those of the returned tokens.
    fhat = vae.apply({'params': vp}, res['idx'], method=lambda m, idx: m.quantize.idx_to_fhat(idx))
    np.testing.assert_allclose(np.asarray(res['f_hat']), np.asarray(fhat), atol=1e-5)
    assert (np.asarray(res['labels']) == tiny.var.num_classes).all()  # in/out-painting: the null class


def test_edit_is_deterministic_and_seeded(tiny, inpaint):
    mask, res = inpaint
    again = sampling.edit(*_models(tiny), tiny.image, mask, None, jax.random.PRNGKey(1), cfg=3.0, return_logits=True)
    other = sampling.edit(*_models(tiny), tiny.image, mask, None, jax.random.PRNGKey(2), cfg=3.0, return_logits=True)
    np.testing.assert_array_equal(np.asarray(again['images']), np.asarray(res['images']))
    assert not np.array_equal(np.asarray(other['idx'][-1]), np.asarray(res['idx'][-1]))


def test_edit_keep_all_reconstructs_and_class_conditional(tiny):
    full = sampling.edit(*_models(tiny), tiny.image, np.ones((8, 8)), None, 0, cfg=3.0, return_logits=True)
    rec = (_nchw_to_nhwc(tiny.z['vae_io/rec_img_B3HW']) + 1) / 2
    np.testing.assert_allclose(np.asarray(full['images']), rec, atol=1e-4)
    # Class-conditional outpainting (keep the box, a class label), per-sample masks.
    masks = np.stack(
        [sampling.rectangle_mask(PN, 0.1, 0.1, 0.8, 0.8, False), sampling.rectangle_mask(PN, 0.0, 0.5, 1.0, 1.0, False)]
    )
    res = sampling.edit(*_models(tiny), tiny.image, masks, np.array([3, 7]), 4, cfg=3.0, return_logits=True)
    for si, k in enumerate(sampling.scale_keep_masks(masks, PN, 2)):
        k = np.asarray(k) > 0.5
        np.testing.assert_array_equal(np.asarray(res['idx'][si])[k], tiny.src_idx[si][k])


# ------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(labels=np.array([0, 11])), 'labels must be in'),  # 10 is the null class
        (dict(labels=np.array([[1, 2]])), '1-D'),
        (dict(labels=None), 'batch_size'),
        (dict(cfg=-0.5), 'cfg'),
        (dict(top_p=1.5), 'top_p'),
        (dict(top_p=-0.1), 'top_p'),
        (dict(top_k=-1), 'top_k'),
        (dict(top_k=65), 'top_k=65 exceeds the vocabulary size 64'),
        (dict(temperature=0.0), 'temperature'),
        (dict(temperature=-1.0), 'temperature'),
    ],
)
def test_sample_rejects_bad_inputs(tiny, kwargs, match):
    args = dict(labels=np.array([1, 2]), key=jax.random.PRNGKey(0)) | kwargs
    labels, key = args.pop('labels'), args.pop('key')
    with pytest.raises(ValueError, match=match):
        sampling.sample(*_models(tiny), labels, key, **args)


@pytest.mark.parametrize(
    'what,match',
    [
        ('image', 'images must be NHWC'),
        ('range', r'in \[-1, 1\]'),
        ('mask', 'mask must be'),
        ('mask_batch', 'mask must be'),
        ('labels', 'labels must be'),
        ('top_p', 'top_p'),
    ],
)
def test_edit_rejects_bad_inputs(tiny, what, match):
    image, mask, labels, kw = tiny.image, np.ones((8, 8)), None, {}
    if what == 'image':
        image = tiny.image[:, :16]
    elif what == 'range':
        image = (tiny.image + 1) * 127.5
    elif what == 'mask':
        mask = np.ones((7, 7))
    elif what == 'mask_batch':
        mask = np.ones((3, 8, 8))
    elif what == 'labels':
        labels = np.array([11, 0])  # 10 is the null class, 11 is out of range
    else:
        kw = dict(top_p=2.0)
    with pytest.raises(ValueError, match=match):
        sampling.edit(*_models(tiny), image, mask, labels, 0, **kw)


def test_unhashable_or_swapped_models_get_the_friendly_error(tiny):
    vae, vp, var, tp = _models(tiny)
    listy = vae.clone(patch_nums=list(PN))  # unhashable: a cached compiled loop would raise a bare TypeError
    with pytest.raises(ValueError, match='tuples .*not lists'):
        sampling.sample(listy, vp, var, tp, np.array([1, 2]), 0)
    with pytest.raises(ValueError, match='tuples .*not lists'):
        sampling.edit(vae, vp, var.clone(patch_nums=list(PN)), tp, tiny.image, np.ones((8, 8)))
    with pytest.raises(ValueError, match=r'expected \(vqvae, vae_params, var, var_params\)'):
        sampling.sample(var, tp, vae, vp, np.array([1, 2]), 0)


def test_negative_label_is_the_null_class(tiny):
    """As the official sampler reads a negative int label: unconditional, so its logits do not depend on cfg."""
    models = _models(tiny)
    kw = dict(top_k=1, return_logits=True)  # the greedy tests' compiled configuration
    guided = sampling.sample(*models, np.array([-1, 3]), 5, cfg=3.0, **kw)
    plain = sampling.sample(*models, np.array([-1, 3]), 5, cfg=0.0, **kw)
    as_int = sampling.sample(*models, -2, 5, cfg=3.0, batch_size=2, **kw)
    assert np.asarray(guided['labels']).tolist() == [10, 3] and np.asarray(as_int['labels']).tolist() == [10, 10]
    for si in range(1, len(PN)):  # cond == uncond for the null class: (1 + t) u - t u = u for every t
        g, p = np.asarray(guided['logits'][si]), np.asarray(plain['logits'][si])
        np.testing.assert_allclose(g[0], p[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(as_int['logits'][si])[1], g[0], atol=1e-4, rtol=0)
        assert np.abs(g[1] - p[1]).max() > 1e-2  # a real class is guided
    np.testing.assert_array_equal(np.asarray(guided['idx'][-1])[0], np.asarray(as_int['idx'][-1])[1])


def test_top_k_above_the_vocabulary_is_refused():
    """The official torch.topk raises for k > V; k == V keeps everything."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 64)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(draws.filter_logits(x, top_k=64)), np.asarray(x))
    with pytest.raises(ValueError, match='top_k=65 exceeds the vocabulary size 64'):
        draws.filter_logits(x, top_k=65)


def test_parse_labels():
    np.testing.assert_array_equal(sample_batches.parse_labels('', 5, 3), [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(sample_batches.parse_labels('7', 3, 10), [7, 7, 7])
    np.testing.assert_array_equal(sample_batches.parse_labels('1, 2,-1', 4, 10), [1, 2, 10, 1])
    with pytest.raises(ValueError, match='sample.labels=.*comma-separated'):
        sample_batches.parse_labels('cat', 4, 10)


def test_sampling_imports_no_api_training_or_tensorflow():
    """Layering: the sampler builds on the models only (docs/ARCHITECTURE.md), so it stays importable without TF."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(sampling))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {f'{n.module}.{a.name}' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    bad = {
        m
        for m in names
        if m.startswith(
            ('var_jax.api', 'var_jax.trainers', 'var_jax.generate', 'var_jax.optim', 'var_jax.input', 'tensorflow')
        )
    }
    assert not bad and any(m.startswith('var_jax.models') for m in names), sorted(names)
