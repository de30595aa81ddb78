"""Shared config pieces: every field main.py and var_jax.train read, with defaults.

Config files build on `base_config()` and override what differs (big_vision style); tests and
command lines override further (`--config.transformer.total_steps=10`).
"""
import math

import ml_collections
from ml_collections import config_dict

IMAGENET_TRAIN_IMAGES = 1_281_167
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def optim(tblr, warmup_steps, *, wd=0.05, wd_end=None, wpe=0.01, clip=2.0):
    """AdamW (0.9, 0.95) with lr = tblr * batch / 256, 'lin0' schedule, cosine weight decay."""
    return ml_collections.ConfigDict(dict(
        tblr=tblr, warmup_steps=warmup_steps, wp0=0.005, wpe=wpe, wd=wd,
        wd_end=wd if wd_end is None else wd_end, clip=clip, beta1=0.9, beta2=0.95))


def base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = 'tokenizer,transformer'   # which stages `--mode=train` runs, in order
    c.init_from = ''                     # converted official checkpoint / a run's export/: skips what it holds
    c.distributed = False                # jax.distributed.initialize() (multi-host GPU / TPU pods)
    c.mesh = ml_collections.ConfigDict(dict(fsdp=1))   # devices per FSDP group; the rest is data parallel

    c.data = ml_collections.ConfigDict(dict(
        source='synthetic', name='var_synthetic_shapes',
        data_dir=config_dict.placeholder(str),   # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
        folder='', train_split='train', eval_split='test', image_size=32, random_flip=False,
        resize_ratio=1.125, synthetic_train_size=10000, synthetic_test_size=1000))

    c.vae = ml_collections.ConfigDict(dict(
        vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
        patch_nums=PATCH_NUMS_256, beta=0.25, quant_resi=0.5, share_quant_resi=4))
    c.var = ml_collections.ConfigDict(dict(
        num_classes=1000,            # <= 0: the dataset's number of classes
        depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.0, drop_path_rate=0.1 * 16 / 24,
        cond_drop_rate=0.1, attn_l2_norm=True, shared_aln=False, init_adaln_gamma=1e-3,
        dtype='float32'))            # compute dtype of the transformer blocks ('bfloat16' on GPU/TPU)

    c.tokenizer = ml_collections.ConfigDict(dict(
        total_steps=10000, batch_size=64, l1=0.2, l2=1.0, restart_every=100,   # dead-code restart (0: off)
        # Optional PatchGAN (VQGAN) adversarial loss; disc_weight 0 = off (no discriminator at all).
        disc_weight=0.0, disc_start=2000, disc_lr=1e-4, disc_ndf=64, disc_layers=3,
        # Optional LPIPS-VGG perceptual loss; perceptual_weight 0 = off (no VGG at all). The weights: a .npz of
        # `python -m var_jax.models.lpips` or a directory with vgg16-397923af.pth and vgg.pth (README, Train).
        perceptual_weight=0.0, perceptual_weights_path='',
        optim=optim(1e-3, 500, wd=0.0, wpe=0.05)))
    c.transformer = ml_collections.ConfigDict(dict(
        total_steps=10000, batch_size=256, label_smoothing=0.0,
        pg=0.0, pg0=4, pgwp_steps=1,           # progressive training (official default off)
        optim=optim(1e-4, 500, wpe=0.1)))

    c.log_every = 100
    c.save_every = 1000
    c.sample_every = 5000
    c.keep_checkpoints = 3
    c.sample = ml_collections.ConfigDict(dict(
        num_images=64, ncols=8, batch_size=64, seed=0, labels='',   # labels: '' = spread over classes
        cfg=1.5, top_k=900, top_p=0.96, temperature=1.0, more_smooth=False))
    return c


def imagenet_config(depth, *, batch_size, epochs, tblr, alng, wpe, wd_end=0.05, image_size=256,
                    shared_aln=False):
    """The official VAR ImageNet recipe (VAR_SPEC 4) for VAR-d<depth> on the released tokenizer.

    Convert the tokenizer first and point init_from at it:
        python -m var_jax.convert --vae vae_ch160v4096z32.pth --out checkpoints/vae
    """
    c = base_config()
    c.stages = 'transformer'
    c.init_from = 'checkpoints/vae'
    c.data.update(dict(source='tfds', name='imagenet2012', train_split='train', eval_split='validation',
                       image_size=image_size))
    c.vae.patch_nums = PATCH_NUMS_512 if image_size == 512 else PATCH_NUMS_256
    c.var.update(dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
                      shared_aln=shared_aln, init_adaln_gamma=alng, dtype='bfloat16'))
    steps_per_epoch = math.ceil(IMAGENET_TRAIN_IMAGES / batch_size)
    c.transformer.update(dict(total_steps=epochs * steps_per_epoch, batch_size=batch_size))
    # Warm-up of epochs/50 epochs, as train.py's default --wp.
    c.transformer.optim = optim(tblr, round(epochs / 50 * steps_per_epoch), wd=0.05, wd_end=wd_end, wpe=wpe)
    c.log_every, c.save_every, c.sample_every = 100, 5000, 20000
    c.mesh.fsdp = 1
    return c
