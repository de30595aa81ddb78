"""VAR-d36-s (2.3B, shared AdaLN) on ImageNet 512 px with the released tokenizer: the official recipe."""

from configs.common import imagenet_config


def get_config():
    c = imagenet_config(
        36, batch_size=768, epochs=350, tblr=8e-5, alng=5e-6, wpe=0.01, wd_end=0.08, image_size=512, shared_aln=True
    )
    c.mesh.fsdp = 8
    return c
