"""Multi-scale residual vector quantizer of VAR (official models/quant.py, VectorQuantizer2).

A latent f (B, h, w, Cvae) is quantized coarse to fine: at scale k the residual is
area-downsampled to pn_k x pn_k, snapped to the nearest code, the code map is bicubic-upsampled
back to h x w, refined by a phi convolution and subtracted from the residual. The running sum
of the refined code maps is f_hat. All of it runs in float32, and every conv / matmul (phi convs,
resizes, the nearest-code search) at `precision`, by default HIGHEST: one flipped argmin changes
every later scale, and accelerators run float32 matmuls at DEFAULT precision as one bfloat16 pass.

Layouts: NHWC maps, token order row-major (l = y * pn + x), indices as lists of (B, pn^2).
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.resize import padded_resize_matrix_2d, resize

# The precision names of VQVAE.encode_precision / decode_precision. 'default' is None: the backend's default for
# float32 (one bfloat16 pass on TPU, TF32 on recent GPUs, float32 on CPU) or jax_default_matmul_precision if set.
PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'high': jax.lax.Precision.HIGH, 'default': None}


def matmul_precision(name: str, field: str) -> Optional[jax.lax.Precision]:
    """'highest' | 'high' | 'default' -> the `precision` argument of the convs and matmuls it governs."""
    if name not in PRECISIONS:
        raise ValueError(
            f'{field}={name!r} is not a matmul precision; use one of {sorted(PRECISIONS)} '
            f"('highest' keeps token ids equal to the float32 reference on TPU/GPU)"
        )
    return PRECISIONS[name]


# The official scale schedules: 10 scales up to 16x16 tokens (256 px) and up to 32x32 (512 px, VAR-d36).
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def validate_patch_nums(patch_nums: Sequence[int]) -> tuple:
    """Checks the scale schedule: at least two strictly increasing positive ints."""
    pns = tuple(int(p) for p in patch_nums)
    if len(pns) < 2 or pns[0] < 1 or any(b <= a for a, b in zip(pns, pns[1:])):
        raise ValueError(
            f'patch_nums must be at least two strictly increasing positive sizes such as '
            f'(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), got {tuple(patch_nums)}'
        )
    return pns


def phi_index_per_scale(num_phis: int, num_scales: int) -> tuple:
    """Which phi conv each scale uses, computed in float64 exactly like the official code.

    Scale si sits at si/(S-1) in [0, 1]; it takes the phi whose tick is nearest. The official
    ticks are linspace(1/(3K), 1-1/(3K), K) for K == 4 and linspace(1/(2K), 1-1/(2K), K)
    otherwise; the 10-scale schedule has exact ties that float64 rounding breaks, so the
    arithmetic must be the same (numpy float64) to get [0,0,1,1,1,2,2,3,3,3].
    """
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))


class Phi(nn.Module):
    """phi(h) = (1 - r) h + r conv3x3(h): the refinement of an upsampled code map."""

    channels: int
    resi_ratio: float
    precision: Optional[jax.lax.Precision] = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, h):
        conv = nn.Conv(self.channels, (3, 3), padding=1, precision=self.precision, name='conv')
        return (1 - self.resi_ratio) * h + self.resi_ratio * conv(h)


class MultiScaleQuantizer(nn.Module):
    """The residual quantizer over `patch_nums` (ints, the side of each square token map).

    share_quant_resi: 0 = one phi per scale, 1 = one shared phi, K > 1 = K phis shared by
    nearby scales (the released tokenizer uses 4). quant_resi is the phi mix ratio r; |r| below
    1e-6 means no phi (identity), as in the official code. precision: of every conv and matmul here
    (None: the backend's default); the token ids need HIGHEST off CPU.
    """

    vocab_size: int
    cvae: int
    patch_nums: Sequence[int]
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    precision: Optional[jax.lax.Precision] = jax.lax.Precision.HIGHEST

    def setup(self):
        self.pns = validate_patch_nums(self.patch_nums)
        num_scales = len(self.pns)
        if self.share_quant_resi < 0:
            raise ValueError(f'share_quant_resi must be >= 0, got {self.share_quant_resi}')
        num_phis = {0: num_scales, 1: 1}.get(self.share_quant_resi, self.share_quant_resi)
        self.phi_index = phi_index_per_scale(num_phis, num_scales)
        if abs(self.quant_resi) > 1e-6:
            self.phis = [Phi(self.cvae, abs(self.quant_resi), self.precision) for _ in range(num_phis)]
        else:
            self.phis = None
        # N(0, 1) like the official nn.Embedding default (its codebook init is never overridden).
        self.embedding = self.param('embedding', nn.initializers.normal(1.0), (self.vocab_size, self.cvae))

    # --- building blocks -------------------------------------------------------------------
    def phi(self, h, si: int):
        """Applies the phi conv of scale `si` (identity when quant_resi is ~0)."""
        return h if self.phis is None else self.phis[self.phi_index[si]](h)

    def nearest_code(self, z):
        """Index of the nearest codebook row (squared L2, first index on ties) for z (..., Cvae)."""
        z = z.astype(jnp.float32)
        e = self.embedding.astype(jnp.float32)
        d = (
            jnp.sum(z * z, axis=-1, keepdims=True)
            + jnp.sum(e * e, axis=-1)
            - 2 * jnp.einsum('...c,vc->...v', z, e, precision=self.precision)
        )
        return jnp.argmin(d, axis=-1).astype(jnp.int32)

    def _resize(self, x, side: int, method: str):
        return resize(x, (side, side), method, self.precision)

    def lookup(self, idx_Bl, pn: int):
        """Code vectors of (B, pn*pn) indices as a (B, pn, pn, Cvae) map."""
        return jnp.take(self.embedding, idx_Bl, axis=0).reshape(idx_Bl.shape[0], pn, pn, self.cvae)

    def upsample_and_phi(self, h, si: int):
        """A scale's code map brought to the full latent canvas and refined (phi).

        At the last scale the map is already full size and resize is the identity, which is the
        official 'no interpolation at the last scale' rule.
        """
        full = self.pns[-1]
        return self.phi(self._resize(h, full, 'bicubic'), si)

    def _check_latent(self, f):
        full = self.pns[-1]
        if f.ndim != 4 or f.shape[1:] != (full, full, self.cvae):
            raise ValueError(
                f'latent must be (B, {full}, {full}, {self.cvae}) for patch_nums {self.pns}, got '
                f'{f.shape}; the last patch size must equal the latent side'
            )

    # --- encoding / decoding ---------------------------------------------------------------
    def f_to_idx(self, f, return_fhat: bool = False):
        """Latent (B, h, w, Cvae) -> per-scale indices [(B, pn^2) int32].

        With return_fhat, also returns the cumulative f_hat after every scale (list of maps).
        """
        self._check_latent(f)
        f_rest = f.astype(jnp.float32)
        f_hat = jnp.zeros_like(f_rest)
        idx_list, fhat_list = [], []
        for si, pn in enumerate(self.pns):
            idx = self.nearest_code(self._resize(f_rest, pn, 'area')).reshape(f.shape[0], pn * pn)
            h = self.upsample_and_phi(self.lookup(idx, pn), si)
            f_hat, f_rest = f_hat + h, f_rest - h
            idx_list.append(idx)
            fhat_list.append(f_hat)
        return (idx_list, fhat_list) if return_fhat else idx_list

    def idx_to_fhat(self, idx_list, cumulative: bool = False):
        """Per-scale indices -> f_hat (B, h, w, Cvae); with cumulative, the list after each scale."""
        f_hat = 0.0
        out = []
        for si, (idx, pn) in enumerate(zip(idx_list, self.pns)):
            f_hat = f_hat + self.upsample_and_phi(self.lookup(idx, pn), si)
            out.append(f_hat)
        return out if cumulative else f_hat

    def idx_to_var_input(self, idx_list):
        """Teacher-forcing input of the transformer: (B, L - pn_0^2, Cvae).

        For each scale k >= 1 the input is the cumulative f_hat of scales < k, area-downsampled
        to pn_k x pn_k and flattened row-major (not the embedding of scale k-1).

        Given the ids every term of f_hat is known at once, so all scales go through each stage
        together (code maps zero-padded to the largest, per-scale resize matrices stacked, one conv
        per phi, a cumulative sum) instead of scale after scale: a few large ops instead of ~8 small
        ones per scale, which is what an accelerator compiler pays for.
        """
        B, pns, C = idx_list[0].shape[0], self.pns, self.cvae
        S, full = len(pns) - 1, pns[-1]  # the scales that feed a next one; the canvas side
        side_in, side_out = max(pns[:S]), max(pns[1:])
        cells = lambda p, side: (np.arange(p)[:, None] * side + np.arange(p)).reshape(-1)  # p x p top-left
        # Each scale's ids in the top-left of a side_in x side_in map; padded cells hold id 0 and meet only zero
        # columns of the resize matrices.
        where = np.zeros((S, side_in * side_in), np.int32)
        for k, start in enumerate(np.cumsum((0,) + tuple(p * p for p in pns[: S - 1]))):
            where[k, cells(pns[k], side_in)] = start + np.arange(pns[k] ** 2)
        ids = jnp.concatenate([i.reshape(B, -1) for i in idx_list[:S]], axis=1)[:, where]
        up = np.stack([padded_resize_matrix_2d(p, full, 'bicubic', side_in, full) for p in pns[:S]])
        h = jnp.einsum(
            'kon,bknc->bkoc',
            jnp.asarray(up, jnp.float32),
            jnp.take(self.embedding, ids, axis=0).astype(jnp.float32),
            precision=self.precision,
        )
        h = h.reshape(B, S, full, full, C)
        if self.phis is not None:  # one conv per phi over all its scales; phi_index is non-decreasing
            h = jnp.concatenate(
                [
                    self.phis[j](h[:, ks].reshape(-1, full, full, C)).reshape(B, len(ks), full, full, C)
                    for j in range(len(self.phis))
                    if (ks := [k for k in range(S) if self.phi_index[k] == j])
                ],
                axis=1,
            )
        f_hat = jnp.cumsum(h.reshape(B, S, full * full, C), axis=1)  # f_hat after scales 0..k
        down = np.stack([padded_resize_matrix_2d(full, p, 'area', full, side_out) for p in pns[1:]])
        x = jnp.einsum('kon,bknc->bkoc', jnp.asarray(down, jnp.float32), f_hat, precision=self.precision)
        keep = np.concatenate([k * side_out * side_out + cells(p, side_out) for k, p in enumerate(pns[1:])])
        return x.reshape(B, S * side_out * side_out, C)[:, keep]

    def next_autoregressive_input(self, si: int, f_hat, h):
        """Adds scale si's code map h (B, pn, pn, Cvae) to f_hat; returns (f_hat, next input map).

        The next input is f_hat area-downsampled to the next scale; after the last scale it is
        f_hat itself.
        """
        f_hat = f_hat + self.upsample_and_phi(h, si)
        if si == len(self.pns) - 1:
            return f_hat, f_hat
        pn_next = self.pns[si + 1]
        return f_hat, self._resize(f_hat, pn_next, 'area')

    # --- training forward ------------------------------------------------------------------
    def __call__(self, f):
        """Training forward: (f_hat straight-through, vq_loss, per-scale code hit counts (S, V)).

        Codes are picked without gradient; the code maps carry gradients into the codebook and
        the phi convs. vq_loss = mean over scales of beta*MSE(sg(f_hat), f) + MSE(f_hat, sg(f)),
        with f_hat the cumulative reconstruction after the scale. The returned f_hat is
        sg(f_hat) - sg(f) + f, so the decoder's gradient reaches the encoder unchanged.
        """
        self._check_latent(f)
        f = f.astype(jnp.float32)
        if self.is_initializing() and self.phis is not None:  # create phis no scale maps to
            for phi in self.phis:
                phi(f)
        f_ng = jax.lax.stop_gradient(f)
        f_rest, f_hat = f_ng, jnp.zeros_like(f_ng)
        loss = 0.0
        hits = []
        for si, pn in enumerate(self.pns):
            idx = self.nearest_code(jax.lax.stop_gradient(self._resize(f_rest, pn, 'area')))
            hits.append(jnp.bincount(idx.reshape(-1), length=self.vocab_size))
            h = self.upsample_and_phi(jnp.take(self.embedding, idx, axis=0), si)
            f_hat = f_hat + h
            f_rest = f_rest - h
            loss = loss + self.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2) + jnp.mean((f_hat - f_ng) ** 2)
        loss = loss / len(self.pns)
        f_hat_st = jax.lax.stop_gradient(f_hat) - f_ng + f
        return f_hat_st, loss, jnp.stack(hits)
