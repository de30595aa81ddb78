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
    for mode in ('train', 'sample'):
        preflight.check(var_small.get_config(), mode, str(tmp_path / 'work'))
    config = var_small.get_config()
    config.eval.inception_path = str(tmp_path / 'inception_fid.npz')
    (tmp_path / 'inception_fid.npz').write_bytes(b'')  # preflight checks that it is there; loading it comes later
    preflight.check(config, 'eval', str(tmp_path / 'work'))


def test_eval_needs_the_inception_file_and_whole_shards(tmp_path):
    msg = _problems(tmp_path, mode='eval')
    assert "eval.inception_path='' is not set" in msg and 'python -m var_jax.convert --inception' in msg
    msg = _problems(
        tmp_path,
        mode='eval',
        **{'eval.inception_path': str(tmp_path / 'nope.npz'), 'eval.num_images': 100, 'eval.batch_size': 30},
    )
    assert 'nope.npz' in msg and 'does not exist' in msg and 'eval.num_images=100 is not divisible' in msg


def test_sample_labels_are_checked_against_the_classes_the_run_will_have(tmp_path):
    """The grids drawn during training use sample.labels: a label the model cannot have is refused at start
    (it used to stop training at the first grid), against var.num_classes or, when that is 0, the data's."""
    msg = _problems(tmp_path, **{'sample.labels': '3,99'})
    assert "sample.labels='3,99'" in msg and 'the model has 10 classes' in msg
    from var_jax.data import synthetic

    msg = _problems(tmp_path, **{'var.num_classes': 0, 'sample.labels': str(synthetic.NUM_CLASSES)})
    assert f'the model has {synthetic.NUM_CLASSES} classes' in msg
    config = var_small.get_config()
    config.sample.labels = '99'
    preflight.check(config, 'sample', str(tmp_path / 'work'))  # the trained model's classes decide there


def _image_folder(root, n_good, bad):
    import numpy as np
    from PIL import Image

    for i in range(n_good):
        d = root / f'class{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 40 * i % 255, np.uint8)).save(d / f'{i}.png')
    for name, content in bad.items():
        (root / 'class0' / name).write_bytes(content)


def test_image_folder_with_unreadable_files(tmp_path):
    """An empty file, a text file named .png and a truncated PNG are skipped with one warning naming them; too
    few readable images for one batch are refused at start, with the count."""
    root = tmp_path / 'images'
    _image_folder(root, 9, {})
    truncated = (root / 'class0' / '0.png').read_bytes()[:60]
    _image_folder(root, 9, {'empty.png': b'', 'text.png': b'hello', 'truncated.png': truncated})
    folder = {'data.source': 'folder', 'data.folder': str(root), 'var.num_classes': 0}
    with pytest.warns(UserWarning, match=r'Skipped 3 of 12 image files .*(empty|text|truncated)\.png'):
        msg = _problems(tmp_path, **folder, **{'transformer.batch_size': 16, 'tokenizer.batch_size': 8})
    assert 'has 9 readable training images per host, fewer than one per-host batch of 16' in msg
    assert 'tokenizer.batch_size' not in msg
    config = var_small.get_config()
    config.update_from_flattened_dict(dict(folder, **{'transformer.batch_size': 8, 'tokenizer.batch_size': 8}))
    preflight.check(config, 'train', str(tmp_path / 'work'))


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
    msg = _problems(tmp_path, **{'transformer.batch_size': 32, 'transformer.grad_accum': 3})
    assert 'transformer.grad_accum=3' in msg and 'divisible by grad_accum x the 4 devices' in msg


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
    return (
        subprocess.Popen(
            [sys.executable, 'main.py', *flags],
            cwd=REPO,
            stdout=out,
            stderr=err,
            text=True,
            env=dict(os.environ, JAX_PLATFORMS='cpu'),
        ),
        out,
        err,
    )


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
    started = [
        _main('--config=configs/var_small.py', '--config.transformer.totl_steps=5', f'--workdir={tmp_path}/w'),
        _main('--config=configs/nope.py'),
        _main('--config=configs/var_small.py', '--config.sample.top_p=1.5', f'--workdir={tmp_path}/w2'),
    ]
    typo, missing, bad = [_finish(s) for s in started]
    for proc in (typo, missing, bad):
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert typo.stderr.strip().splitlines() == [
        'error: a --config.<field> flag is wrong: no field "totl_steps"; did you mean "total_steps"? '
        '(configs/common.py lists every field)'
    ]
    assert not os.path.exists(f'{tmp_path}/w')  # nothing written
    assert len(missing.stderr.strip().splitlines()) == 1 and 'configs/nope.py: no such file' in missing.stderr
    assert 'top_p' in bad.stderr and not os.path.exists(f'{tmp_path}/w2/tokenizer')  # nothing trained


def test_each_mode_refuses_a_wrong_path_in_one_line(tmp_path):
    """train, sample and eval (the converter: tests/test_convert.py): a wrong input path exits 2 with one line."""
    started = {
        'train': _main(
            '--config=configs/var_small.py',
            '--config.data.source=folder',
            f'--config.data.folder={tmp_path}/no_images',
            f'--workdir={tmp_path}/a',
        ),
        'sample': _main(
            '--config=configs/var_small.py',
            '--mode=sample',
            f'--config.init_from={tmp_path}/no_ckpt',
            f'--workdir={tmp_path}/b',
        ),
        'eval': _main(
            '--config=configs/var_small.py',
            '--mode=eval',
            f'--workdir={tmp_path}/c',
            f'--config.eval.inception_path={tmp_path}/no_inception.npz',
        ),
    }
    expect = {'train': 'no_images', 'sample': 'no_ckpt', 'eval': 'no_inception.npz'}
    for mode, s in started.items():
        proc = _finish(s)
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith('error: ')]
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, (mode, proc.stderr[-2000:])
        assert len(lines) == 1 and expect[mode] in proc.stderr, (mode, proc.stderr[-2000:])
