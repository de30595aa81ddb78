"""The small benchmark config (benchmarks/*.py): 32 px, VAR-d6 width 384 over 1000 classes, batch 32.

Sized for a laptop CPU; the models only (nothing is trained, random weights). Override like any config:

    python benchmarks/train.py --config=configs/bench.py --config.var.dtype=bfloat16
"""

from configs.common import base_config, official_var


def get_config():
    c = base_config()
    c.data.image_size = 32
    # Tokenizer 32 px -> 8x8 latent over 6 scales; VAR-d6 made wider (384) and with 6 heads.
    c.vae.update(dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), patch_nums=(1, 2, 3, 4, 6, 8)))
    c.var.update(official_var(6))
    c.var.update(dict(embed_dim=384, num_heads=6, num_classes=1000))
    c.tokenizer.batch_size = 32
    c.transformer.batch_size = 32
    c.sample.update(dict(batch_size=32, num_images=32, cfg=1.5, top_k=100, top_p=0.95))
    return c
