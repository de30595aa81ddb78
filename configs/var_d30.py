"""VAR-d30 (2.0B) on ImageNet 256 px with the released tokenizer: the official recipe (FSDP over 8)."""

from configs.common import imagenet_config


def get_config():
    c = imagenet_config(30, batch_size=1024, epochs=350, tblr=8e-5, alng=1e-5, wpe=0.01, wd_end=0.08)
    c.mesh.fsdp = 8
    return c
