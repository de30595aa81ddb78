"""Progressive training's token weights against the official trainer, simulated step by step."""

import numpy as np
import pytest

from var_jax.trainers import transformer


# =============================================================================================
# Progressive training weights
# =============================================================================================
def official_progressive_weights(patch_nums, total, warmup, pg, pg0, pgwp):
    """(total, L) loss weights of the official trainer, simulated step by step (train.py's prog_si and
    trainer.py's VARTrainer.train_step state: prog_it, last_prog_si, first_prog), truncation = weight 0."""
    K = len(patch_nums)
    ends = np.cumsum([p * p for p in patch_nums])
    L = int(ends[-1])
    last, first, prog_it, out = -1, True, 0, []
    for it in range(total):
        if not pg:
            si = -1
        elif it <= warmup:
            si = pg0
        elif it >= total * pg:
            si = K - 1
        else:
            progress = min(max((it - warmup) / (total * pg - warmup), 0), 1)
            si = pg0 + round(progress * (K - 1 - pg0))
        if last != si:
            if last != -1:
                first = False
            last, prog_it = si, 0
        prog_it += 1
        wp = 1 if first else max(min(prog_it / pgwp, 1), 0.01)
        if si == K - 1:
            si = -1
        w = np.full(L, 1 / L)
        if si >= 0:
            bg, ed = (ends[si - 1] if si else 0), ends[si]
            w[ed:] = 0
            w[bg:ed] *= min(max(wp, 0), 1)
        out.append((si, w))
    return out


PROG_CASES = [
    ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 200, 20, 0.6, 4, 7),
    ((1, 2, 4, 8), 60, 0, 0.8, 1, 3),
    ((1, 2, 4, 8), 50, 5, 0.5, 0, 1),
]


def test_progressive_weights_off():
    for pns in [(1, 2, 4, 8), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]:
        L = sum(p * p for p in pns)
        for step in (0, 7, 999):
            w = transformer.progressive_token_weights(pns, step, 1000, 10, pg=0.0, pg0=4, pgwp_steps=5)
            np.testing.assert_array_equal(w, np.full(L, 1 / L, np.float32))
            assert w.dtype == np.float32


@pytest.mark.parametrize('case', PROG_CASES)
def test_progressive_weights_match_official_before_the_last_stage(case):
    pns, total, warmup, pg, pg0, pgwp = case
    ref = official_progressive_weights(pns, total, warmup, pg, pg0, pgwp)
    stages, ramped = set(), 0
    for step, (si, want) in enumerate(ref):
        if si < 0:
            continue
        stages.add(si)
        ramped += bool(0 < want[want > 0].min() < want.max())
        got = transformer.progressive_token_weights(pns, step, total, warmup, pg=pg, pg0=pg0, pgwp_steps=pgwp)
        end = int(np.cumsum([p * p for p in pns])[si])  # the sequence is truncated at the stage's last scale
        assert got.shape == (end,) and not want[end:].any(), (step, si, got.shape)
        np.testing.assert_allclose(got, want[:end], rtol=1e-6, atol=0, err_msg=f'step {step}, stage {si}')
    assert len(stages) >= 2  # the cases cross stage boundaries ...
    assert (ramped > 0) == (pgwp > 1)  # ... and ramp the newest scale when pgwp > 1


@pytest.mark.parametrize('case', [c for c in PROG_CASES if c[-1] > 1])
def test_progressive_weights_match_official_in_the_last_stage(case):
    pns, total, warmup, pg, pg0, pgwp = case
    for step, (si, want) in enumerate(official_progressive_weights(pns, total, warmup, pg, pg0, pgwp)):
        if si < 0:
            got = transformer.progressive_token_weights(pns, step, total, warmup, pg=pg, pg0=pg0, pgwp_steps=pgwp)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=f'step {step}')


def test_pgwp_defaults_to_the_official_ep_over_300():
    """Official: pgwp = ep/300 epochs when not given, i.e. total_steps / 300 steps."""
    from configs.common import base_config

    cfg = base_config().transformer
    assert cfg.pgwp_steps == 0
    cfg.total_steps = 3000
    assert transformer.pgwp_steps(cfg) == 10
    cfg.pgwp_steps = 7
    assert transformer.pgwp_steps(cfg) == 7
