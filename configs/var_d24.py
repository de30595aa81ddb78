"""VAR-d24 (1.0B) on ImageNet 256 px with the released tokenizer: the official recipe."""

from configs.common import imagenet_config


def get_config():
    return imagenet_config(24, batch_size=768, epochs=350, tblr=8e-5, alng=1e-4, wpe=0.01)
