"""CIFAR-10 (32 px, 10 classes) from TFDS: both stages from scratch.

Prepare the data once on a machine with internet: `tfds build cifar10 --data_dir=DIR`, then
pass --config.data.data_dir=DIR.
"""

from configs.common import base_config, optim


def get_config():
    c = base_config()
    c.data.update(
        dict(source='tfds', name='cifar10', train_split='train', eval_split='test', image_size=32, random_flip=True)
    )
    c.vae.update(
        dict(vocab_size=4096, z_channels=32, ch=128, ch_mult=(1, 2, 2), num_res_blocks=2, patch_nums=(1, 2, 3, 4, 6, 8))
    )
    c.var.update(dict(num_classes=10, depth=12, embed_dim=768, num_heads=12, drop_path_rate=0.05, dtype='bfloat16'))
    c.tokenizer.update(dict(total_steps=50000, batch_size=128, optim=optim(1e-3, 1000, wd=0.0, wpe=0.05)))
    c.transformer.update(dict(total_steps=100000, batch_size=256, optim=optim(2e-4, 2000, wpe=0.1)))
    c.sample.update(dict(num_images=100, ncols=10, batch_size=100, cfg=2.0))
    return c
