"""VAR-d20 (600M) on ImageNet 256 px with the released tokenizer: the official recipe."""

from configs.common import imagenet_config


def get_config():
    return imagenet_config(20, batch_size=768, epochs=250, tblr=1e-4, alng=1e-3, wpe=0.1)
