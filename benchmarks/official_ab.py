"""Our sampler and train step vs the official PyTorch VAR, side by side in one process on the same cores.

    git clone https://github.com/FoundationVision/VAR /path/to/VAR     # imported from there, nothing is copied
    python benchmarks/official_ab.py --official_repo=/path/to/VAR [--config=configs/bench.py] [--iters 5]

Models of the config's architecture, random weights (speed does not depend on them), float32:
1. sampling, decode included: `var_jax.sampling.sample` vs `VAR.autoregressive_infer_cfg` (config.sample's batch,
   cfg, top-k, top-p, more_smooth; temperature 1: the official has none);
2. a train step on config.transformer's batch: ours (`common.transformer_program`) vs the work of the official
   `VARTrainer.train_step`: `img_to_idxBl`, `idxBl_to_var_input`, forward, cross-entropy, backward, grad clip and
   fused AdamW (the official default).
After one warm-up call each (ours compiles) the four programs run round-robin, so other processes' load hits
both sides alike. Both use the cores this process may run on: torch gets that many threads, XLA:CPU sizes its
pool by them (so `taskset -c 0 python benchmarks/official_ab.py ...` compares one core against one core).
Shims, without editing the official files: a stand-in `huggingface_hub.PyTorchModelHubMixin` if huggingface_hub
is missing (only the Hub mixin of VARHF uses it), and the config's tokenizer ch_mult / num_res_blocks passed to the
official Encoder and Decoder (its VQVAE hard-codes (1, 1, 2, 2, 4) / 2).
"""

import contextlib
import io
import os
import statistics
import sys
import time
import types

import jax
import numpy as np
from absl import app, flags

from var_jax import api, sampling, sharding
from var_jax.trainers import loop

import common

common.define_config_flag()
flags.DEFINE_string('official_repo', None, 'clone of github.com/FoundationVision/VAR')
flags.DEFINE_integer('iters', 5, 'timed rounds (after one warm-up call of each program)')
FLAGS = flags.FLAGS


def import_official(path: str):
    """The official `models` package of the clone at `path`, with the shims of the module docstring."""
    if not path or not os.path.isfile(os.path.join(path, 'models', 'var.py')):
        raise SystemExit(
            f'--official_repo={path!r} is not a clone of the official VAR (no models/var.py); run '
            'git clone https://github.com/FoundationVision/VAR /path/to/VAR and pass that path'
        )
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        sys.modules['huggingface_hub'] = types.SimpleNamespace(PyTorchModelHubMixin=type('HubMixin', (), {}))
    sys.path.insert(0, os.path.abspath(path))
    import models
    import models.vqvae

    return models


def official_models(config, models):
    """Official (VQVAE, VAR) with the config's hyper-parameters and the official initialisation."""
    v, t = config.vae, config.var
    enc, dec = models.vqvae.Encoder, models.vqvae.Decoder
    arch = {'ch_mult': tuple(v.ch_mult), 'num_res_blocks': v.num_res_blocks}
    models.vqvae.Encoder = lambda **kw: enc(**{**kw, **arch})
    models.vqvae.Decoder = lambda **kw: dec(**{**kw, **arch})
    try:
        vae = models.VQVAE(
            vocab_size=v.vocab_size,
            z_channels=v.z_channels,
            ch=v.ch,
            beta=v.beta,
            quant_resi=v.quant_resi,
            share_quant_resi=v.share_quant_resi,
            v_patch_nums=tuple(v.patch_nums),
            test_mode=True,
        )
    finally:
        models.vqvae.Encoder, models.vqvae.Decoder = enc, dec
    vae.downsample = 2 ** (len(v.ch_mult) - 1)
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints its settings
        var = models.VAR(
            vae,
            num_classes=t.num_classes,
            depth=t.depth,
            embed_dim=t.embed_dim,
            num_heads=t.num_heads,
            mlp_ratio=t.mlp_ratio,
            drop_path_rate=t.drop_path_rate,
            norm_eps=1e-6,
            shared_aln=t.shared_aln,
            cond_drop_rate=t.cond_drop_rate,
            attn_l2_norm=t.attn_l2_norm,
            patch_nums=tuple(v.patch_nums),
        )
        var.init_weights(init_adaln=0.5, init_adaln_gamma=t.init_adaln_gamma, init_head=0.02, init_std=-1)
    return vae, var


def millions(m) -> str:
    """Parameter count of a torch module or a JAX params tree (same architecture: same count)."""
    leaves = list(m.parameters()) if hasattr(m, 'parameters') else jax.tree.leaves(m)
    return f'{sum(int(np.prod(x.shape)) for x in leaves) / 1e6:.2f}'


def timed(fn):
    """(wall s, process CPU s) of one blocking call."""
    c0, t0 = os.times(), time.perf_counter()
    fn()
    c1 = os.times()
    return time.perf_counter() - t0, c1.user + c1.system - c0.user - c0.system


def ours(config, vqvae, var, images, labels, sample_labels):
    """(sample, train step, VAR params, VQVAE params): our sampler (compiled on its first call) and the trainer's
    compiled step, as benchmarks/sample.py and train.py run them."""
    s, batch, L = config.sample, len(labels), common.seq_len(var)
    vae_params, var_params = api.init_params(vqvae, var, jax.random.PRNGKey(0))
    sample = lambda: jax.block_until_ready(
        sampling.sample(
            vqvae,
            vae_params,
            var,
            var_params,
            sample_labels,
            jax.random.PRNGKey(0),
            cfg=s.cfg,
            top_k=s.top_k,
            top_p=s.top_p,
            temperature=1.0,
            more_smooth=s.more_smooth,
        )['images']
    )
    mesh = sharding.make_mesh(config.mesh.fsdp)
    step, args, tx = common.transformer_program(config, vqvae, var, mesh, batch)
    step = step.lower(*args).compile()
    box = {'state': loop.init_state(mesh, tx, config.seed, common.var_init_fn(var))[0]}
    data = sharding.global_batch({'image': images, 'label': labels}, mesh)
    weights = jax.device_put(np.full((L,), 1.0 / L, np.float32), sharding.replicated(mesh))

    def train():
        box['state'], m = step(box['state'], vae_params, data, weights)
        jax.block_until_ready((box['state'], m))

    return sample, train, var_params, vae_params


def official(config, vae, var, images, labels, sample_labels):
    """(sample, train step): autoregressive_infer_cfg (returns decoded images) and VARTrainer.train_step's work."""
    import torch

    s, o, batch, V = config.sample, config.transformer.optim, len(labels), vae.vocab_size
    label_s, lab = torch.from_numpy(sample_labels).long(), torch.from_numpy(labels).long()
    img = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(o.beta1, o.beta2), weight_decay=o.wd, fused=True)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=config.transformer.label_smoothing, reduction='none')
    loss_weight = torch.full((1, var.L), 1.0 / var.L)

    def sample():
        var.eval()  # no drop path
        var.autoregressive_infer_cfg(
            B=len(sample_labels),
            label_B=label_s,
            g_seed=0,
            cfg=s.cfg,
            top_k=s.top_k,
            top_p=s.top_p,
            more_smooth=s.more_smooth,
        )

    def train():
        var.train()
        gt_idx = vae.img_to_idxBl(img)
        gt = torch.cat(gt_idx, dim=1)
        logits = var(lab, vae.quantize.idxBl_to_var_input(gt_idx))
        loss = ce(logits.view(-1, V), gt.view(-1)).view(batch, -1).mul(loss_weight).sum(dim=-1).mean()
        loss.backward()
        if o.clip > 0:
            torch.nn.utils.clip_grad_norm_(var.parameters(), o.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return sample, train


def main(_):
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    models = import_official(FLAGS.official_repo)
    config = common.config()
    if config.var.dtype != 'float32':
        raise SystemExit(
            f'config.var.dtype={config.var.dtype!r}: the official side runs float32 on CPU; pass '
            '--config.var.dtype=float32'
        )
    s, batch = config.sample, config.transformer.batch_size
    vqvae, var = common.models(config)
    R = vqvae.image_size
    vae_t, var_t = official_models(config, models)
    rng = np.random.default_rng(0)
    data = (
        rng.uniform(-1, 1, (batch, R, R, 3)).astype(np.float32),
        rng.integers(0, var.num_classes, batch).astype(np.int32),
        rng.integers(0, var.num_classes, s.batch_size).astype(np.int32),
    )
    ours_sample, ours_train, var_params, vae_params = ours(config, vqvae, var, *data)
    off_sample, off_train = official(config, vae_t, var_t, *data)
    tasks = [('sample', ours_sample, off_sample), ('train step', ours_train, off_train)]
    first = {name: (timed(a)[0], timed(b)[0]) for name, a, b in tasks}  # warm-up (ours: trace + compile)
    res = {name: ([], []) for name, _, _ in tasks}
    for _ in range(FLAGS.iters):  # round-robin: other processes' load hits both sides alike
        for name, a, b in tasks:
            res[name][0].append(timed(a))
            res[name][1].append(timed(b))

    print(
        f'JAX {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}); '
        f'torch {torch.__version__}: {torch.get_num_threads()} threads; {len(os.sched_getaffinity(0))} of '
        f'{os.cpu_count()} CPUs, load average {" ".join(f"{x:.1f}" for x in os.getloadavg())}'
    )
    print(
        f'VAR d{var.depth} w{var.embed_dim} h{var.num_heads} patch_nums {tuple(var.patch_nums)} V{var.vocab_size} '
        f'Cvae{var.cvae}; VQVAE ch {vqvae.ch} ch_mult {tuple(vqvae.ch_mult)}, {R} px; float32; params (M) ours / '
        f'official: VAR {millions(var_params)} / {millions(var_t)}, VQVAE {millions(vae_params)} / {millions(vae_t)}'
    )
    print(
        f'sample: batch {s.batch_size}, cfg {s.cfg}, top-k {s.top_k}, top-p {s.top_p}, decode included; '
        f'train step: batch {batch}, tokenise + forward + backward + clip + AdamW; {FLAGS.iters} rounds\n'
    )
    cols = [
        'task',
        'ours s (median)',
        'official s (median)',
        'ours / official',
        'ours CPU s',
        'official CPU s',
        'first call ours / official s',
    ]
    print('| ' + ' | '.join(cols) + ' |\n|' + '|'.join('---' for _ in cols) + '|')
    med = lambda xs, i: statistics.median(x[i] for x in xs)
    for name, (a, b) in res.items():
        print(
            f'| {name} | {med(a, 0):.3f} | {med(b, 0):.3f} | {med(a, 0) / med(b, 0):.2f} | {med(a, 1):.2f} | '
            f'{med(b, 1):.2f} | {first[name][0]:.1f} / {first[name][1]:.1f} |'
        )


if __name__ == '__main__':
    app.run(main)
