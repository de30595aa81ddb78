"""The official learning-rate and weight-decay schedules (utils/lr_control.py), written out as references."""

import math


def official_lr(it, peak, wp_it, max_it, wp0, wpe, sche='lin0'):
    """utils/lr_control.lr_wd_annealing of the official code, every sche_type, in plain Python."""
    if it < wp_it:
        cur = wp0 + (1 - wp0) * it / wp_it
    else:
        pasd = (it - wp_it) / (max_it - 1 - wp_it)
        rest = 1 - pasd
        if sche == 'cos':
            cur = wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
        elif sche in ('lin', 'lin0'):
            T = 0.15 if sche == 'lin' else 0.05
            cur = 1 if pasd < T else wpe + (1 - wpe) * rest / (1 - T)
        elif sche == 'lin00':
            cur = wpe + (1 - wpe) * rest
        elif sche == 'exp':
            cur = 1 if pasd < 0.15 else math.exp((pasd - 0.15) / 0.85 * math.log(wpe))
        else:  # 'lin<T>', which the official train.py uses when --pg > 0
            T = float(sche[3:])
            mid = (1 + wpe + (1 - wpe) * (1 - T)) / 2
            cur = 1 + (mid - 1) * pasd / T if pasd < T else wpe + (mid - wpe) * rest / (1 - T)
    return cur * peak


def official_wd(it, wd, wd_end, max_it):
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / (max_it - 1)))
