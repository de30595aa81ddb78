"""The offline default: tokenizer then transformer on the project's own synthetic shapes (32 px).

    python main.py --config=configs/var_small.py

Sized to finish both stages within about 15 minutes on 2 CPU cores; the dataset is generated
locally on first use, so no internet is needed.
"""

from configs.common import base_config, optim


def get_config():
    c = base_config()
    # 10 classes of shapes, 32x32; tokenizer 32 px -> 8x8 latent over 6 scales.
    c.vae.update(
        dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4, 6, 8))
    )
    c.var.update(dict(num_classes=10, depth=4, embed_dim=256, num_heads=4, drop_path_rate=0.0))
    c.tokenizer.update(dict(total_steps=500, batch_size=32, restart_every=25, optim=optim(3e-2, 50, wd=0.0, wpe=0.05)))
    c.transformer.update(dict(total_steps=750, batch_size=32, optim=optim(1e-2, 50, wpe=0.1)))
    c.log_every, c.save_every, c.sample_every = 50, 250, 250
    c.keep_checkpoints = 2
    c.sample.update(dict(num_images=40, ncols=10, batch_size=40, cfg=3.0, top_k=20, top_p=0.9))
    return c
