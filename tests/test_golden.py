"""tests/data/tiny_public.npz regenerates bit for bit from the official code (tests/make_golden.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA

OFFICIAL = os.environ.get('VAR_OFFICIAL')


@pytest.mark.slow
@pytest.mark.skipif(not OFFICIAL, reason='VAR_OFFICIAL is not set (a checkout of FoundationVision/VAR at 78b9539)')
def test_make_golden_reproduces_the_fixture(tmp_path):
    pytest.importorskip('torch')
    out = tmp_path / 'tiny_public.npz'
    script = os.path.join(os.path.dirname(__file__), 'make_golden.py')
    subprocess.run(
        [sys.executable, script, '--official', OFFICIAL, '--out', str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    made, golden = np.load(out), np.load(os.path.join(DATA, 'tiny_public.npz'))
    assert sorted(made.files) == sorted(golden.files)
    differ = [k for k in golden.files if made[k].dtype != golden[k].dtype or not np.array_equal(made[k], golden[k])]
    assert not differ, f'{len(differ)} arrays differ, e.g. {differ[:5]}'
