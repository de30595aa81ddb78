"""Your own images in class subfolders (folder/<class>/*.jpg), 256 px, on the released tokenizer.

    python -m var_jax.convert --vae vae_ch160v4096z32.pth --out checkpoints/vae
    python main.py --config=configs/image_folder.py --config.data.folder=/path/to/images

The number of classes is read from the folder. Set --config.stages=tokenizer,transformer and
--config.init_from= to train a tokenizer of your own instead.
"""

from configs.common import base_config, optim


def get_config():
    c = base_config()
    c.stages = 'transformer'
    c.init_from = 'checkpoints/vae'
    c.data.update(dict(source='folder', folder='', image_size=256, random_flip=True))
    c.var.update(
        dict(num_classes=0, depth=16, embed_dim=1024, num_heads=16, drop_path_rate=0.1 * 16 / 24, dtype='bfloat16')
    )
    c.transformer.update(dict(total_steps=50000, batch_size=256, optim=optim(1e-4, 1000, wpe=0.1)))
    return c
