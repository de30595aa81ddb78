"""KV-cached class-conditional sampling and zero-shot editing with VAR (official
models/var.py, VAR.autoregressive_infer_cfg).

One `jax.jit`-compiled function runs the whole next-scale loop: a Python loop over the static
scale sizes (unrolled, so every shape is static), a KV cache per block that each scale returns grown by
its own keys and values (the keys its attention reads: no cache-sized buffer is zero-filled, sliced or
updated in place), classifier-free guidance on a doubled batch [cond; uncond] that shares a single f_hat. A second
compiled function decodes f_hat to pixels: one per tokenizer, shared by every sampler setting and
by editing (the decoder is a large share of an accelerator compile), and not run where only tokens
are wanted. Settings that change shapes or the program (top_k, whether top-p is on, more_smooth,
return_logits, editing or not) are static; labels, key, cfg, top_p and temperature are traced, so a
new label set, seed, cfg or top_p value reuses the compiled function. Compiled functions are cached
per (models, static settings, target platform); on TPU they compile at XLA's least optimisation effort
(TPU_COMPILER_OPTIONS).

Editing (inpainting, outpainting, class-conditional editing) is the same loop with a per-scale
replacement: where the keep mask is 1 the sampled embeddings are replaced by the source image's
own token embeddings before they update f_hat. The logits and KV of a scale remain the model's
own, as in the official notebook. Teacher forcing (every token replaced) is the same mechanism and is
what the tests use to check the cached loop against the full forward pass.

Differences from the official code, all deliberate:
- Sampling uses JAX's counter-based RNG (on CPU one uniform per token, inverse CDF; on TPU / GPU
  Gumbel-max), so samples cannot match torch.multinomial streams bit for bit, nor a CPU's those of an
  accelerator; greedy sampling (top_k=1) and the logits do.
  Each scale uses its own split of the key, so a key fixes the whole sample.
- top-p keeps every token tied in probability with the smallest surviving one (the official scatter
  removes an arbitrary subset of such ties); for untied probabilities the result is identical.
- `temperature` is an addition (1.0 = official): logits are divided by it before filtering.
- A negative label means the null class in label arrays too (the official code maps a negative int label).
"""

import functools
import math
import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import tokenize
from var_jax.draws import sample_logits
from var_jax.models.platform import target_platform
from var_jax.models.var import VAR
from var_jax.models.vqvae import VQVAE

_TRACES = [0]  # incremented each time the scale loop is traced; tests use it to catch retraces.


# ------------------------------------------------------------------------------------------------
# The compiled scale loop (shared by sample, edit and the teacher-forcing check)
# ------------------------------------------------------------------------------------------------
def _scale_loop(
    vqvae,
    var,
    top_k,
    use_top_p,
    more_smooth,
    return_logits,
    vae_params,
    var_params,
    labels,
    key,
    cfg,
    top_p,
    temperature,
    src_idx=None,
    keep=None,
):
    """Traced body. src_idx / keep: None, or per-scale (B, pn^2) source tokens and keep masks in {0, 1}."""
    _TRACES[0] += 1
    v = var.bind({'params': var_params})
    vae = vqvae.bind({'params': vae_params})
    q = vae.quantize
    pns = tuple(var.patch_nums)
    K, B, Cv = len(pns), labels.shape[0], var.cvae
    codebook = q.embedding.astype(jnp.float32)

    cond = v.cond(jnp.concatenate([labels, jnp.full_like(labels, var.num_classes)]))  # [cond; uncond]
    x = v.start_tokens(cond)
    cache = v.init_cache(2 * B)
    f_hat = jnp.zeros((B, pns[-1], pns[-1], Cv), jnp.float32)
    keys = jax.random.split(key, K)
    idx_out, logits_out = [], []
    for si, pn in enumerate(pns):
        ratio = si / (K - 1)
        out, cache = v.step(si, x, cond, cache)
        t = cfg * ratio
        logits = (1 + t) * out[:B] - t * out[B:]  # float32 guided logits
        k_idx, k_gumbel = jax.random.split(keys[si])
        idx, masked = sample_logits(
            k_idx, logits, top_k=top_k, top_p=top_p, temperature=temperature, use_top_p=use_top_p
        )
        if more_smooth:  # soft Gumbel embedding of the masked logits (the official visual-only mode)
            tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
            u = jax.random.uniform(k_gumbel, masked.shape, jnp.float32, jnp.finfo(jnp.float32).tiny, 1.0)
            g = -jnp.log(-jnp.log(u))  # Gumbel(0, 1) as the official -log(Exp(1)), Exp(1) = -log(u)
            h = jax.nn.softmax((masked * (1 + ratio) + g) / tau, axis=-1) @ codebook
        else:
            h = jnp.take(codebook, idx, axis=0)
        if src_idx is not None:  # editing / teacher forcing: use the source's tokens where kept
            m = keep[si]
            h = jnp.take(codebook, src_idx[si], axis=0) * m[..., None] + h * (1 - m[..., None])
            idx = jnp.where(m > 0.5, src_idx[si], idx)
        idx_out.append(idx)
        if return_logits:
            logits_out.append(logits)
        f_hat, nxt = q.next_autoregressive_input(si, f_hat, h.reshape(B, pn, pn, Cv))
        if si + 1 < K:
            x = v.scale_tokens(si + 1, nxt.reshape(B, pns[si + 1] ** 2, Cv))
            x = jnp.concatenate([x, x])  # cond and uncond halves share f_hat
    res = {'idx': idx_out, 'f_hat': f_hat}
    if return_logits:
        res['logits'] = logits_out
    return res


# XLA's optimisation effort for the sampler's programs on TPU: the least. The scale loop and the decode then
# compile several times faster and XLA's own runtime estimates barely move (docs/benchmarks.md, benchmarks/aot.py);
# a sampler is compiled per setting, a train step once per run. Elsewhere XLA's default (on CPU the setting
# changed nothing measurable; on GPU it is not measured).
TPU_COMPILER_OPTIONS = {'exec_time_optimization_effort': -1.0}


def compiled_loop(vqvae, var, top_k: int, use_top_p: bool, more_smooth: bool, return_logits: bool):
    """The jitted scale loop for one (models, static settings), for the platform traced for."""
    return _jitted_loop(vqvae, var, top_k, use_top_p, more_smooth, return_logits, target_platform())


def compiled_decode(vqvae):
    """The jitted decode f_hat -> images in [0, 1] of one tokenizer, for the platform traced for."""
    return _jitted_decode(vqvae, target_platform())


@functools.lru_cache(maxsize=32)
def _jitted_loop(vqvae, var, top_k, use_top_p, more_smooth, return_logits, platform):
    """Cached per (models, settings, platform); linen modules hash by their fields."""
    return jax.jit(
        functools.partial(_scale_loop, vqvae, var, top_k, use_top_p, more_smooth, return_logits),
        compiler_options=compiler_options(platform),
    )


@functools.lru_cache(maxsize=8)
def _jitted_decode(vqvae, platform):
    return jax.jit(
        lambda vae_params, f_hat: vqvae.apply({'params': vae_params}, f_hat, method=VQVAE.fhat_to_img) * 0.5 + 0.5,
        compiler_options=compiler_options(platform),
    )


def compiler_options(platform):
    return TPU_COMPILER_OPTIONS if platform == 'tpu' else None


def _with_images(vqvae, vae_params, res):
    return dict(res, images=compiled_decode(vqvae)(vae_params, res['f_hat']))


# ------------------------------------------------------------------------------------------------
# Validation (outside jit, so errors are plain Python exceptions with readable messages)
# ------------------------------------------------------------------------------------------------
def _check_models(vqvae, var):
    """Runs before any cached or jitted function, which would raise a bare TypeError on unhashable models."""
    if not (isinstance(vqvae, VQVAE) and isinstance(var, VAR)):
        raise ValueError(
            f'expected (vqvae, vae_params, var, var_params), a VQVAE and a VAR; got {type(vqvae).__name__}'
            f' and {type(var).__name__} (load them with var_jax.load_pretrained or build_models)'
        )
    try:
        hash((vqvae, var))
    except TypeError as e:
        raise ValueError(
            'build the models with tuples (patch_nums, ch_mult), not lists (var_jax.build_models converts '
            'them): compiled samplers are cached per model configuration, which must be hashable'
        ) from e
    if tuple(vqvae.patch_nums) != tuple(var.patch_nums):
        raise ValueError(
            f'VQVAE patch_nums {tuple(vqvae.patch_nums)} differ from VAR patch_nums '
            f'{tuple(var.patch_nums)}; build both with the same schedule'
        )
    if (vqvae.vocab_size, vqvae.z_channels) != (var.vocab_size, var.cvae):
        raise ValueError(
            f'VAR expects vocabulary {var.vocab_size} and Cvae {var.cvae}, the VQVAE has '
            f'{vqvae.vocab_size} and {vqvae.z_channels}'
        )


def check_settings(*, cfg, top_k, top_p, temperature, vocab_size: int) -> None:
    """Raises ValueError naming the first sampling setting that cannot work (also used by var_jax.preflight)."""
    if not (isinstance(cfg, numbers.Real) and math.isfinite(cfg) and cfg >= 0):
        raise ValueError(f'cfg must be a finite number >= 0 (0 = no guidance), got {cfg!r}')
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f'top_k must be an int >= 0 (0 = off), got {top_k!r}')
    if top_k > vocab_size:  # the official torch.topk raises for k > V too
        raise ValueError(
            f'top_k={top_k} exceeds the vocabulary size {vocab_size}; use top_k <= {vocab_size} (or 0 = off)'
        )
    if not (isinstance(top_p, numbers.Real) and 0.0 <= top_p <= 1.0):
        raise ValueError(f'top_p must be in (0, 1], or 0 to turn nucleus filtering off; got {top_p!r}')
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f'temperature must be a finite number > 0 (1 = official), got {temperature!r}')


def _labels_array(var, labels, batch_size):
    """Labels as a (B,) int32 array; a negative label is the null class num_classes (official int labels).

    Values above num_classes are refused: they would index past the class embedding.
    """
    n = var.num_classes
    if isinstance(labels, (int, np.integer)):
        if batch_size is None:
            raise ValueError('an int label needs batch_size')
        labels = np.full((batch_size,), labels)
    given = labels
    if isinstance(labels, jax.Array) and not labels.is_fully_addressable:  # several hosts: check this one's part
        shape, labels = labels.shape, np.concatenate([np.asarray(s.data).ravel() for s in labels.addressable_shards])
    else:
        labels = np.asarray(labels)
        shape = labels.shape
    if len(shape) != 1 or shape[0] == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels must be a non-empty 1-D integer array (B,), got shape {shape} dtype {labels.dtype}')
    if batch_size is not None and shape[0] != batch_size:
        raise ValueError(f'{shape[0]} labels for batch_size {batch_size}')
    if labels.max() > n:
        raise ValueError(
            f'labels must be in [0, {n}) for the {n} classes, or {n} or negative for the null '
            f'class (unconditional); got values {labels.min()}..{labels.max()}'
        )
    if isinstance(given, jax.Array):  # keep the caller's placement (e.g. a batch-sharded array)
        given = given.astype(jnp.int32)
        return jnp.where(given < 0, n, given) if labels.min() < 0 else given
    return jnp.asarray(np.where(labels < 0, n, labels), jnp.int32)


def _as_key(key):
    """An int seed or a PRNG key -> a PRNG key."""
    if isinstance(key, numbers.Integral):
        return jax.random.PRNGKey(int(key))
    return key


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def sample(
    vqvae,
    vae_params,
    var,
    var_params,
    labels,
    key,
    *,
    cfg: float = 1.5,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    more_smooth: bool = False,
    return_logits: bool = False,
    batch_size: Optional[int] = None,
):
    """Class-conditional generation (official `autoregressive_infer_cfg`).

    labels: (B,) ints in [0, num_classes), one int (needs batch_size), or None for uniform
    random classes (needs batch_size; drawn from a split of `key`). A negative label (or
    num_classes) is the null class, i.e. unconditional, as the official sampler treats a negative
    int label; the returned 'labels' hold num_classes there. cfg: guidance; scale si uses
    t = cfg * si / (K - 1) and logits (1 + t) cond - t uncond. top_k: 0 = off, at most the
    vocabulary size (the official torch.topk refuses k > V). top_p: nucleus
    mass in (0, 1]; 0 means off (the official default). temperature divides the logits before
    filtering. more_smooth: the official Gumbel-softmax soft embeddings (visual only; tokens are
    still sampled and returned).

    Returns {'idx': [(B, pn^2) int32 per scale], 'images': (B, R, R, 3) float32 in [0, 1],
    'f_hat': (B, pn_last, pn_last, Cvae), 'labels': (B,)}, plus with return_logits 'logits':
    [(B, pn^2, V) guided logits before temperature and filtering]. Deterministic for a given key.
    """
    _check_models(vqvae, var)
    check_settings(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, vocab_size=var.vocab_size)
    key = _as_key(key)
    if labels is None:
        if batch_size is None or batch_size < 1:
            raise ValueError('labels=None draws random classes and needs batch_size >= 1')
        key, lkey = jax.random.split(key)
        labels = jax.random.randint(lkey, (batch_size,), 0, var.num_classes, jnp.int32)
    else:
        labels = _labels_array(var, labels, batch_size)
    res = compiled_loop(vqvae, var, int(top_k), bool(top_p > 0), bool(more_smooth), bool(return_logits))(
        vae_params, var_params, labels, key, jnp.float32(cfg), jnp.float32(top_p), jnp.float32(temperature)
    )
    return dict(_with_images(vqvae, vae_params, res), labels=labels)


def rectangle_mask(
    patch_nums: Sequence[int], y0: float, x0: float, y1: float, x1: float, inpainting: bool = True
) -> np.ndarray:
    """Keep mask (pn_last, pn_last) float32 for a box given in fractions of the side (official get_edit_mask).

    The box [round(y0*s):round(y1*s), round(x0*s):round(x1*s)] is 1 (Python round, as official).
    inpainting=True regenerates the box and keeps the rest (mask = 1 - box); False (outpainting)
    keeps the box and regenerates the rest.
    """
    s = int(patch_nums[-1])
    if not (0 <= y0 <= y1 <= 1 and 0 <= x0 <= x1 <= 1):
        raise ValueError(
            f'box fractions must satisfy 0 <= y0 <= y1 <= 1 and 0 <= x0 <= x1 <= 1, got ({y0}, {x0}, {y1}, {x1})'
        )
    m = np.zeros((s, s), np.float32)
    m[round(y0 * s) : round(y1 * s), round(x0 * s) : round(x1 * s)] = 1
    return 1 - m if inpainting else m


@functools.lru_cache(maxsize=None)
def _torch_bilinear_f32(n_in: int, n_out: int) -> np.ndarray:
    """torch's 1-D bilinear weights (align_corners=False) as torch computes them, in float32.

    Why not `resize_matrix(..., 'bilinear')`: that is the exact (float64) interpolation, while
    torch rounds the source index once in float32 (scale = float32(n_in / n_out), then a fused
    multiply-add). For 16 -> 13 (the official 256-px schedule) torch puts row 6 at 7.5000005,
    so a mask edge gets 0.50000048 > 0.5 where the exact value 0.5 is not: the thresholded
    edit masks would differ. These weights equal torch's for every size pair tested (<= 512).
    """
    scale = np.float32(n_in) / np.float32(n_out)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        src = np.float32(max(float(scale) * (i + 0.5) - 0.5, 0.0))  # one rounding, like an FMA
        x0 = min(int(np.floor(src)), n_in - 1)
        lam = np.float32(min(max(src - np.float32(x0), np.float32(0)), np.float32(1)))
        m[i, x0] += np.float32(1) - lam
        m[i, min(x0 + 1, n_in - 1)] += lam
    return m


def scale_keep_masks(mask, patch_nums: Sequence[int], batch_size: int, image_size: Optional[int] = None) -> list:
    """Per-scale keep masks [(B, pn^2) float32 in {0, 1}] from one mask (1 = keep the source).

    mask: (S, S) or (B or 1, S, S), S = pn_last (official) or `image_size`; bool or float.
    Each scale gets torch's float32 bilinear resize (align_corners=False, no antialias) to
    pn x pn, thresholded at > 0.5; the 1x1 scale keeps everything (official: pn^2 <= 3 -> 1).
    """
    m = np.asarray(mask)
    if m.ndim == 2:
        m = m[None]
    sides = (patch_nums[-1],) if image_size is None else (patch_nums[-1], image_size)
    if m.ndim != 3 or m.shape[1] != m.shape[2] or m.shape[1] not in sides or m.shape[0] not in (1, batch_size):
        raise ValueError(
            f'mask must be (S, S) or (B or 1, S, S) with B = {batch_size} and S in {sides} '
            f'(the last patch size or the image side), got shape {np.shape(mask)}'
        )
    m = np.broadcast_to(m.astype(np.float32), (batch_size,) + m.shape[1:])
    out = []
    for pn in patch_nums:
        if pn * pn <= 3:
            out.append(jnp.ones((batch_size, pn * pn), jnp.float32))
            continue
        r = _torch_bilinear_f32(m.shape[1], pn)
        small = np.einsum('oh,bhw,pw->bop', r, m, r) > 0.5
        out.append(jnp.asarray(small.reshape(batch_size, pn * pn), jnp.float32))
    return out


def edit(
    vqvae,
    vae_params,
    var,
    var_params,
    image,
    mask,
    labels=None,
    key=0,
    *,
    cfg: float = 1.5,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    more_smooth: bool = False,
    return_logits: bool = False,
):
    """Zero-shot inpainting / outpainting / class-conditional editing (the paper's zero-shot task
    generalisation; official demo_zero_shot_edit.ipynb, its autoregressive_infer_cfg_with_mask).

    image: (B, R, R, 3) in [-1, 1] at the model resolution. mask: see `scale_keep_masks`
    (1 = keep the source; `rectangle_mask` builds the official box masks). labels: None (the
    null class: in/out-painting; so do negative labels and num_classes), one int or (B,) ints
    in [0, num_classes) (a class = class-conditional editing). Other settings as in `sample`.

    The returned 'idx' are the tokens actually used: the source image's tokens in the kept
    region, the sampled ones elsewhere; 'src_idx' are the source tokens of every scale.
    """
    _check_models(vqvae, var)
    check_settings(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, vocab_size=var.vocab_size)
    R = vqvae.image_size
    src_idx = tokenize.encode(vqvae, vae_params, image)  # checks the images' shape and range
    B = image.shape[0]
    keep = scale_keep_masks(mask, var.patch_nums, B, R)
    labels = _labels_array(var, var.num_classes if labels is None else labels, B)
    res = compiled_loop(vqvae, var, int(top_k), bool(top_p > 0), bool(more_smooth), bool(return_logits))(
        vae_params,
        var_params,
        labels,
        _as_key(key),
        jnp.float32(cfg),
        jnp.float32(top_p),
        jnp.float32(temperature),
        src_idx,
        keep,
    )
    return dict(_with_images(vqvae, vae_params, res), labels=labels, src_idx=src_idx)


def teacher_forced(vqvae, vae_params, var, var_params, labels, idx_list):
    """The cached loop with every token forced to `idx_list` (per-scale (B, pn^2)) and cfg 0.

    Its 'logits' equal the full teacher-forced forward `var.apply(params, labels, x_wo_first)`
    sliced per scale and its 'f_hat' equals `quantize.idx_to_fhat(idx_list)`: a check of the KV cache,
    the scale inputs and the f_hat updates of the sampler.
    """
    _check_models(vqvae, var)
    labels = _labels_array(var, labels, None)
    B = labels.shape[0]
    keep = [jnp.ones((B, pn * pn), jnp.float32) for pn in var.patch_nums]
    fn = compiled_loop(vqvae, var, 0, False, False, True)
    return fn(
        vae_params,
        var_params,
        labels,
        jax.random.PRNGKey(0),
        jnp.float32(0),
        jnp.float32(0),
        jnp.float32(1),
        [jnp.asarray(i, jnp.int32) for i in idx_list],
        keep,
    )
