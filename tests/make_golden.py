"""Regenerates the golden arrays of tests/data/tiny_public.npz from the official PyTorch code (docs/testing.md).

    python tests/make_golden.py --official /path/to/VAR@78b9539 --out /tmp/tiny_public.npz

The official repository is read from --official or $VAR_OFFICIAL. The recipe (seeds, the perturbation per
parameter group) is the one the fixture's `config` entry records; the config itself is copied from
tests/data/tiny_public.npz, since its diagnostics are not recomputed here.
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, 'data', 'tiny_public.npz')
PATCH_NUMS = (1, 2, 4, 8)
SEED, VAE_SEED, VAR_SEED = 0, 3, 1
D = C = 64
CVAE = 8
# First match wins (substring of the parameter name); each matched parameter gets scale * randn added.
VAR_RULES = [
    ('ada_lin.1.weight', 1.0 / D**0.5),
    ('shared_ada_lin.1.weight', 1.0 / D**0.5),
    ('ada_lin.1.bias', 0.3),
    ('shared_ada_lin.1.bias', 0.3),
    ('ada_gss', 0.3),
    ('head.weight', 1.0 / C**0.5),
    ('head.bias', 0.1),
    ('class_emb.weight', 0.3),
    ('word_embed.weight', 0.5 / CVAE**0.5),
    ('scale_mul_1H11', 0.1),
    ('', 0.02),
]


def build(torch):
    """The official VQVAE (with ch_mult (1, 2, 2) instead of its hard-coded one) and VAR, official init."""
    from models import vqvae
    from models.var import VAR

    torch.manual_seed(SEED)
    enc, dec = vqvae.Encoder, vqvae.Decoder
    vqvae.Encoder = lambda **kw: enc(**{**kw, 'ch_mult': (1, 2, 2)})
    vqvae.Decoder = lambda **kw: dec(**{**kw, 'ch_mult': (1, 2, 2)})
    try:
        vae = vqvae.VQVAE(
            vocab_size=64, z_channels=CVAE, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=PATCH_NUMS
        )
    finally:
        vqvae.Encoder, vqvae.Decoder = enc, dec
    var = VAR(
        vae_local=vae,
        num_classes=10,
        depth=2,
        embed_dim=D,
        num_heads=2,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1 * 2 / 24,
        norm_eps=1e-6,
        shared_aln=False,
        cond_drop_rate=0.1,
        attn_l2_norm=True,
        patch_nums=PATCH_NUMS,
        flash_if_available=False,
        fused_if_available=False,
    )
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    return vae, var


def perturb(torch, vae, var):
    """Seeded perturbation (so that no output is trivially small), then every parameter rounded to bfloat16."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(VAE_SEED)
        emb = vae.quantize.embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=g) * 0.2 * (torch.rand(emb.shape[0], 1, generator=g) * 1.25 + 0.25))
        for name, p in vae.named_parameters():
            if 'norm' in name.split('.')[-2]:  # GroupNorm weights and biases
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        g = torch.Generator().manual_seed(VAR_SEED)
        for name, p in var.named_parameters():
            p.add_(next(s for r, s in VAR_RULES if r in name) * torch.randn(p.shape, generator=g))
        for p in list(vae.parameters()) + list(var.parameters()):
            p.copy_(p.to(torch.bfloat16).float())


def images(torch, batch=2, size=32):
    g = torch.Generator().manual_seed(SEED + 2)
    x = torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(x, size=(size, size), mode='bicubic')
    return (x + 0.15 * torch.randn(batch, 3, size, size, generator=g)).clamp(-1, 1)


def vae_io(torch, vae, img):
    out = {'vae_io/img_B3HW': img}
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(img))
        idx = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False)
        fhats = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
        dec = vae.decoder(vae.post_quant_conv(fhats[-1]))
    out['vae_io/f_BChw'] = f
    out.update({f'vae_io/idx_Bl/{i:02d}': t for i, t in enumerate(idx)})
    out['vae_io/idx_BL'] = torch.cat(idx, 1)
    out['vae_io/fhat_per_scale_SBChw'] = torch.stack(fhats)
    out['vae_io/fhat_BChw'] = fhats[-1]
    out['vae_io/dec_raw_B3HW'] = dec
    out['vae_io/rec_img_B3HW'] = dec.clamp(-1, 1)
    return out, idx


def var_io_and_train(torch, vae, var, idx, labels):
    """Teacher-forcing logits in eval mode without cond drop, and the official trainer's loss and gradients."""
    var.eval()
    var.cond_drop_rate = 0.0
    x = vae.quantize.idxBl_to_var_input(idx)
    label_B = torch.tensor(labels)
    logits = var(label_B, x)
    gt = torch.cat(idx, 1)
    B, L, V = logits.shape
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.0, reduction='none')
    loss = ce(logits.view(-1, V), gt.view(-1)).view(B, -1).mul(torch.ones(1, L) / L).sum(-1).mean()
    var.zero_grad()
    loss.backward()
    out = {'var_io/x_BLCv_wo_first_l': x, 'var_io/label_B': label_B, 'var_io/logits_BLV': logits, 'train/loss': loss}
    out.update({f'train/grad/{n}': p.grad for n, p in var.named_parameters() if p.requires_grad})
    return out


def sample(torch, vae, var, labels, cfg):
    """Greedy sampling with the official loop; the per-scale logits (after guidance) and tokens are recorded."""
    import models.var as official_var

    pre = f'sample/cfg{cfg:g}/'
    out = {pre + 'label_B': torch.tensor(labels), pre + 'cfg': torch.tensor(cfg, dtype=torch.float32)}
    scales, fhats = [], []
    pick, step = official_var.sample_with_top_k_top_p_, vae.quantize.get_next_autoregressive_input

    def recording_pick(logits_BlV, **kw):
        logits = logits_BlV.clone()  # the official helper masks its argument in place
        idx = pick(logits_BlV, **kw)
        scales.append((logits, idx[:, :, 0]))
        return idx

    def recording_step(*args):
        f_hat, nxt = step(*args)
        fhats.append(f_hat.clone())
        return f_hat, nxt

    official_var.sample_with_top_k_top_p_, vae.quantize.get_next_autoregressive_input = recording_pick, recording_step
    try:
        with torch.no_grad():
            img = var.autoregressive_infer_cfg(
                len(labels), torch.tensor(labels), g_seed=0, cfg=cfg, top_k=1, top_p=0.0, more_smooth=False
            )
            dec = vae.decoder(vae.post_quant_conv(fhats[-1]))
    finally:
        official_var.sample_with_top_k_top_p_ = pick
        del vae.quantize.get_next_autoregressive_input
    for i, (logits, idx) in enumerate(scales):
        out[pre + f'idx_Bl/{i:02d}'] = idx
        out[pre + f'logits_BlV/{i:02d}'] = logits
    out[pre + 'idx_BL'] = torch.cat([idx for _, idx in scales], 1)
    out[pre + 'fhat_BChw'] = fhats[-1]
    out[pre + 'dec_raw_B3HW'] = dec
    out[pre + 'img_B3HW'] = img
    return out


def make(official):
    sys.path.insert(0, official)
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    vae, var = build(torch)
    perturb(torch, vae, var)
    out, idx = vae_io(torch, vae, images(torch))
    out.update(var_io_and_train(torch, vae, var, idx, [3, 7]))
    for cfg in (1.0, 3.0):
        out.update(sample(torch, vae, var, [2, 9], cfg))
    out.update({'vae/' + k: v for k, v in vae.state_dict().items()})
    out.update({'var/' + k: v for k, v in var.state_dict().items()})
    arrays = {k: v.detach().cpu().numpy() for k, v in out.items()}
    arrays['config'] = np.load(FIXTURE)['config']
    return arrays


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        '--official',
        default=os.environ.get('VAR_OFFICIAL'),
        help='checkout of FoundationVision/VAR at 78b9539 (default: $VAR_OFFICIAL)',
    )
    ap.add_argument('--out', required=True, help='the .npz to write')
    args = ap.parse_args()
    if not args.official or not os.path.isfile(os.path.join(args.official, 'models', 'var.py')):
        sys.exit(
            'make_golden: no official checkout; pass --official DIR or set VAR_OFFICIAL '
            '(git clone FoundationVision/VAR and check out 78b9539)'
        )
    np.savez_compressed(args.out, **make(args.official))


if __name__ == '__main__':
    main()
