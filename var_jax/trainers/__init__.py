"""Training: stage 1 (`tokenizer`) then stage 2 (`transformer`), over the shared loop in `loop`."""
from var_jax.trainers import loop, tokenizer, transformer

STAGES = ('tokenizer', 'transformer')


def run(config, workdir: str):
    """The stages named in config.stages, in order ('tokenizer,transformer' by default)."""
    stages = [s.strip() for s in config.stages.split(',') if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f'unknown stages {sorted(unknown)} in config.stages={config.stages!r}; '
                         f'use "tokenizer", "transformer" or "tokenizer,transformer"')
    pretrained = loop.load_init_from(config)
    vae_params = tokenizer.train(config, workdir, pretrained) if 'tokenizer' in stages else None
    if 'transformer' in stages:
        from var_jax import data
        transformer.train(config, workdir, data.num_classes(config.data), vae_params, pretrained)
