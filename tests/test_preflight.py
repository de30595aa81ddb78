"""Start-up checks: every setting that cannot work is named, with its fix, before anything compiles or is written."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from configs import var_small
from var_jax import preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problems(tmp_path, mode='train', workdir=None, **overrides):
    config = var_small.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(preflight.ConfigError) as e:
        preflight.check(config, mode, workdir or str(tmp_path / 'work'))
    return str(e.value)


def test_the_default_config_passes(tmp_path):
    for mode in preflight.MODES:
        preflight.check(var_small.get_config(), mode, str(tmp_path / 'work'))


def test_sampling_settings_are_checked_before_training(tmp_path):
    """Today's failure mode: sample.top_p=1.5 trained to the end, then crashed drawing the grid."""
    msg = _problems(tmp_path, **{'sample.top_p': 1.5, 'sample.num_images': 0})
    assert 'sample.top_p' in msg and '1.5' in msg and 'sample.num_images=0' in msg
    assert _problems(tmp_path, **{'sample.top_k': 10_000}).count('exceeds the vocabulary size 512') == 1
    assert 'sample.labels' in _problems(tmp_path, **{'sample.labels': 'cat,dog'})


def test_batch_sizes_must_split_over_the_devices(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.jax, 'device_count', lambda: 4)
    msg = _problems(tmp_path, **{'transformer.batch_size': 30, 'tokenizer.batch_size': 0})
    assert 'transformer.batch_size=30 is not divisible by the 4 devices' in msg and 'e.g. 28' in msg
    assert 'tokenizer.batch_size=0 must be an int >= 1' in msg
    assert 'mesh.fsdp=3 must divide' in _problems(tmp_path, **{'mesh.fsdp': 3})


def test_workdir_that_is_a_file_or_cannot_be_created(tmp_path):
    (tmp_path / 'file').write_text('x')
    assert 'is a file' in _problems(tmp_path, workdir=str(tmp_path / 'file'))
    assert 'is not writable' in _problems(tmp_path, workdir=str(tmp_path / 'file' / 'sub'), mode='sample')


def test_broken_init_from_names_the_file(tmp_path):
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    assert 'model.json not found' in _problems(tmp_path, init_from=str(ckpt))
    (ckpt / 'model.json').write_text('{"vae": ')
    msg = _problems(tmp_path, init_from=str(ckpt))
    assert str(ckpt / 'model.json') in msg and 'not a valid model config' in msg
    (ckpt / 'model.json').write_text(json.dumps({'tokenizer': {}}))
    assert 'expected {"vae"' in _problems(tmp_path, init_from=str(ckpt))


def test_bad_data_and_stage_settings(tmp_path):
    msg = _problems(tmp_path, stages='tokenizer,transfomer', **{'data.image_size': 64, 'data.resize_ratio': 0.5})
    assert 'stages=' in msg and 'data.resize_ratio=0.5' in msg and 'set data.image_size=32' in msg
    msg = _problems(tmp_path, **{'vae.encode_precision': 'fp32', 'vae.decode_precision': 'high'})
    assert "vae.encode_precision='fp32' is not a matmul precision" in msg and 'decode_precision' not in msg
    msg = _problems(tmp_path, **{'vae.decode_dtype': 'float16'})
    assert "vae.decode_dtype='float16': use 'float32' or 'bfloat16'" in msg


def _main(*flags):
    """main.py started in the background (the three runs of the test overlap): (Popen, its output files)."""
    out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
    return subprocess.Popen([sys.executable, 'main.py', *flags], cwd=REPO, stdout=out, stderr=err, text=True,
                            env=dict(os.environ, JAX_PLATFORMS='cpu')), out, err


def _finish(started):
    proc, out, err = started
    try:
        proc.wait(300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def test_command_line_mistakes_are_one_line_with_exit_code_2(tmp_path):
    started = [_main('--config=configs/var_small.py', '--config.transformer.totl_steps=5', f'--workdir={tmp_path}/w'),
               _main('--config=configs/nope.py'),
               _main('--config=configs/var_small.py', '--config.sample.top_p=1.5', f'--workdir={tmp_path}/w2')]
    typo, missing, bad = [_finish(s) for s in started]
    for proc in (typo, missing, bad):
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert typo.stderr.strip().splitlines() == [
        'error: a --config.<field> flag is wrong: no field "totl_steps"; did you mean "total_steps"? '
        '(configs/common.py lists every field)']
    assert not os.path.exists(f'{tmp_path}/w')  # nothing written
    assert len(missing.stderr.strip().splitlines()) == 1 and 'configs/nope.py: no such file' in missing.stderr
    assert 'top_p' in bad.stderr and not os.path.exists(f'{tmp_path}/w2/tokenizer')  # nothing trained
