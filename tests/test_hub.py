"""Official weights by name (var_jax.hub), offline: a Hugging Face cache laid out as huggingface_hub lays it
out (models--FoundationVision--var/{blobs,refs/main,snapshots/<commit>}) holding tiny random-weight
official-format .pth files, with HF_HUB_OFFLINE=1."""

import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from var_jax import convert, hub
from var_jax.models.var import PATCH_NUMS_256, block_causal_mask, level_ids

from conftest import golden_state_dict

torch = pytest.importorskip('torch')
huggingface_hub = pytest.importorskip('huggingface_hub')
from huggingface_hub import constants as hf_constants  # noqa: E402

COMMIT = 'a' * 40


def tiny_official(golden):
    """The golden tiny VQVAE / VAR state dicts, the VAR's position tables and buffers redrawn for the 256-px
    schedule the released models use (680 tokens), so the files convert as the released ones do."""
    rng = np.random.default_rng(0)
    vae, var = golden_state_dict(golden, 'vae/'), golden_state_dict(golden, 'var/')
    C, L = var['pos_1LC'].shape[-1], sum(p * p for p in PATCH_NUMS_256)
    var.update(
        {
            'pos_1LC': rng.normal(0, 0.02, (1, L, C)).astype(np.float32),
            'lvl_embed.weight': rng.normal(0, 0.02, (len(PATCH_NUMS_256), C)).astype(np.float32),
            'lvl_1L': level_ids(PATCH_NUMS_256)[None].astype(np.int64),
            'attn_bias_for_masking': np.where(block_causal_mask(PATCH_NUMS_256), 0.0, -np.inf).astype(np.float32)[
                None, None
            ],
        }
    )
    return vae, var


def save_pth(sd, path):
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)


def hub_cache(root, files):
    """{filename: state dict} -> a huggingface_hub cache of FoundationVision/var at COMMIT (blobs named by
    their sha256, snapshot entries linking to them, refs/main naming the commit)."""
    repo = root / 'models--FoundationVision--var'
    (repo / 'blobs').mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'snapshots' / COMMIT).mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(COMMIT)
    for name, sd in files.items():
        tmp = root / name
        save_pth(sd, tmp)
        blob = repo / 'blobs' / hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.rename(blob)
        os.symlink(os.path.relpath(blob, repo / 'snapshots' / COMMIT), repo / 'snapshots' / COMMIT / name)
    return root


@pytest.fixture
def offline(golden, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at a cache holding the tokenizer and var_d16.pth (tiny); the
    converted cache in tmp_path/var_jax. huggingface_hub reads both variables when imported, so its
    constants are set as well."""
    vae, var = tiny_official(golden)
    cache = hub_cache(tmp_path / 'hf', {hub.VAE_FILE: vae, 'var_d16.pth': var})
    for k, v in (('HF_HUB_OFFLINE', '1'), ('HF_HUB_CACHE', str(cache)), ('VAR_JAX_CACHE', str(tmp_path / 'vj'))):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    return dict(cache=cache, vae=vae, var=var, tmp=tmp_path)


def count_conversions(monkeypatch):
    calls = []
    real = convert.convert_files
    monkeypatch.setattr(convert, 'convert_files', lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def assert_same_params(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_from_pretrained_reads_the_hub_cache_and_converts_once(offline, monkeypatch):
    import var_jax

    calls = count_conversions(monkeypatch)
    vqvae, vae_params, var, var_params = var_jax.from_pretrained('var-d16')
    # the same models as converting the two files directly
    _, want_vae, want_var_model, want_var = var_jax.load_official(offline['vae'], offline['var'])
    assert_same_params(vae_params, want_vae)
    assert_same_params(var_params, want_var)
    assert var == want_var_model and tuple(var.patch_nums) == PATCH_NUMS_256
    assert len(calls) == 1 and all(COMMIT in p for p in calls[0])  # read from the snapshot
    again = var_jax.from_pretrained('hf:var-d16')
    assert len(calls) == 1  # the converted checkpoint reused
    assert_same_params(again[3], var_params)
    converted = os.listdir(offline['tmp'] / 'vj' / 'converted')
    assert len(converted) == 1 and converted[0].startswith('var-d16-')


def test_a_changed_file_is_converted_again(offline, monkeypatch):
    first = hub.converted_dir('var-d16')
    var = dict(offline['var'], **{'head.bias': offline['var']['head.bias'] + 1})
    blob = os.path.realpath(offline['cache'] / 'models--FoundationVision--var' / 'snapshots' / COMMIT / 'var_d16.pth')
    save_pth(var, blob)
    calls = count_conversions(monkeypatch)
    second = hub.converted_dir('var-d16')
    assert second != first and len(calls) == 1


def test_a_local_directory_needs_no_hub(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', lambda *a, **k: pytest.fail('the hub was asked'))
    local = tmp_path / 'files'
    local.mkdir()
    save_pth(offline['vae'], local / hub.VAE_FILE)
    out = hub.resolve_init_from(f'hf:vae:{local}')
    vqvae, vae_params, var, _ = __import__('var_jax').load_pretrained(out)
    assert var is None and tuple(vqvae.patch_nums) == PATCH_NUMS_256
    assert hub.resolve_init_from('checkpoints/vae') == 'checkpoints/vae'  # not a name: left alone


def test_wrong_name_and_missing_file_say_the_fix(offline, tmp_path):
    with pytest.raises(ValueError, match=r"unknown pretrained name 'var-d17'; use one of vae, vae-512, var-d16"):
        hub.from_pretrained('var-d17')
    with pytest.raises(
        FileNotFoundError,
        match=r'var_d20.pth of FoundationVision/var is not in the Hugging Face '
        r'cache .* use hf:var-d20:DIR',
    ):
        hub.from_pretrained('var-d20')
    with pytest.raises(FileNotFoundError, match=r'var_d16.pth not found: download'):
        hub.resolve_init_from(f'hf:var-d16:{tmp_path}')


_MAIN = {}  # 'future': main.py with a bad name, a background job of the session (start_background)


def start_background(jobs, items, tmp_path_factory, config):
    """tests/conftest.py (background_jobs) calls this first: the subprocess runs on the background lane."""
    if any(item.name == 'test_init_from_name_on_the_command_line' for item in items):
        _MAIN['future'] = jobs.submit(_run_main, tmp_path_factory.mktemp('hub_main'))


def _run_main(tmp):
    from conftest import ENVIRON

    env = dict(
        ENVIRON, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp / 'hf'), VAR_JAX_CACHE=str(tmp / 'vj')
    )
    return subprocess.run(
        [
            sys.executable,
            'main.py',
            '--config=configs/var_small.py',
            '--mode=sample',
            '--config.init_from=hf:var-d99',
            f'--workdir={tmp / "w"}',
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def test_init_from_name_on_the_command_line():
    """main.py with a wrong hf: name exits 2 with one line naming the fix, before anything compiles."""
    r = _MAIN['future'].result()
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: init_from: unknown pretrained name 'var-d99'")
