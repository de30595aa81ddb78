"""Training: stage 1 (`tokenizer`) then stage 2 (`transformer`), over the shared loop in `loop`."""

from var_jax.trainers import loop, tokenizer, transformer

STAGES = ('tokenizer', 'transformer')


def stages_of(config) -> list:
    """The stage names of config.stages, in order (preflight refuses names not in STAGES)."""
    return [s.strip() for s in str(config.stages).split(',') if s.strip()]


def run(config, workdir: str):
    """The stages named in config.stages, in order ('tokenizer,transformer' by default)."""
    stages = stages_of(config)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(
            f'unknown stages {sorted(unknown)} in config.stages={config.stages!r}; '
            f'use "tokenizer", "transformer" or "tokenizer,transformer"'
        )
    pretrained = loop.load_init_from(config)
    vae_params = tokenizer.train(config, workdir, pretrained) if 'tokenizer' in stages else None
    if 'transformer' in stages:
        from var_jax import data

        transformer.train(config, workdir, data.num_classes(config.data), vae_params, pretrained)
