"""The official-checkpoint converter: every official key consumed, architecture inferred, clear errors."""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import api, convert
from var_jax.models.var import VAR, block_causal_mask, level_ids, var_config_for_depth

from conftest import DATA, GOLDEN_PATCH_NUMS, golden_state_dict


def count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def fake_state_dict(entries, patch_nums):
    """Zero tensors (broadcast views, no memory) of the official shapes, with valid buffers."""
    sd = {}
    for key, shape, dtype in entries:
        if key == 'lvl_1L':
            sd[key] = level_ids(patch_nums)[None].astype(np.int64)
        elif key == 'attn_bias_for_masking':
            sd[key] = np.where(block_causal_mask(patch_nums), 0.0, -np.inf).astype(np.float32)[None, None]
        else:
            sd[key] = np.broadcast_to(np.zeros((), dtype), shape)
    return sd


def manifest_sections():
    """{'VQVAE': (entries, params), 'd16': ..., 'd36': ...} with every block expanded."""
    sections, name = {}, None
    for line in open(os.path.join(DATA, 'state_dict_manifest.txt')):
        if m := re.match(r'==== (?:VAR (d\d+)|(VQVAE)) .*params (\d+)', line):
            name = m.group(1) or m.group(2)
            sections[name] = ([], int(m.group(3)))
        elif name and (m := re.match(r'^(\S+) \(([\d, ]*)\)( int64)?$', line.strip())):
            shape = tuple(int(s) for s in m.group(2).split(',') if s.strip())
            sections[name][0].append((m.group(1), shape, np.int64 if m.group(3) else np.float32))
    for name, (entries, n) in sections.items():
        if name.startswith('d'):
            depth = int(name[1:])
            block0 = [(k[len('blocks.0.') :], s, d) for k, s, d in entries if k.startswith('blocks.0.')]
            entries[:] = [e for e in entries if not e[0].startswith('blocks.')] + [
                (f'blocks.{i}.{k}', s, d) for i in range(depth) for k, s, d in block0
            ]
    return sections


def test_d16_and_released_vae_every_key_consumed():
    keys = json.load(open(os.path.join(DATA, 'd16_keys.json')))
    entries = lambda part: [(e['key'], tuple(e['shape']), np.dtype(e['dtype'])) for e in keys[part]]
    vae_cfg, vae_params = convert.convert_vae(fake_state_dict(entries('vae'), convert.PATCH_NUMS_256))
    var_cfg, var_params = convert.convert_var(fake_state_dict(entries('var'), convert.PATCH_NUMS_256))
    assert count(vae_params) == keys['num_params']['vae'] == 108_948_355
    assert count(var_params) == keys['num_params']['var'] == 310_283_520
    assert (vae_cfg['ch'], vae_cfg['ch_mult'], vae_cfg['vocab_size'], vae_cfg['z_channels']) == (
        160,
        (1, 1, 2, 2, 4),
        4096,
        32,
    )
    assert vae_cfg['share_quant_resi'] == 4 and vae_cfg['using_sa'] and vae_cfg['using_mid_sa']
    assert (var_cfg['depth'], var_cfg['embed_dim'], var_cfg['num_heads']) == (16, 1024, 16)
    assert var_cfg['attn_l2_norm'] and not var_cfg['shared_aln'] and var_cfg['num_classes'] == 1000


@pytest.mark.parametrize('name', ['d20', 'd24', 'd30', 'd36'])
def test_every_official_depth_converts(name):
    entries, n = manifest_sections()[name]
    pns = convert.PATCH_NUMS_512 if name == 'd36' else convert.PATCH_NUMS_256
    cfg, params = convert.convert_var(fake_state_dict(entries, pns), pns)
    assert count(params) == n
    assert cfg['shared_aln'] == (name == 'd36') and cfg['depth'] == int(name[1:])


@pytest.mark.parametrize(
    'depth,n', [(16, 310_283_520), (20, 600_917_136), (24, 1_033_399_360), (30, 2_010_020_356), (36, 2_353_893_904)]
)
def test_parameter_counts_of_the_depth_constructor(depth, n):
    kw = dict(shared_aln=True, patch_nums=convert.PATCH_NUMS_512) if depth == 36 else {}
    var = VAR(**var_config_for_depth(depth, **kw))
    L = sum(p * p for p in var.patch_nums)
    shapes = jax.eval_shape(var.init, jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - 1, 32)))
    assert count(shapes['params']) == n


def test_one_report_lists_missing_unexpected_and_misshaped(golden):
    sd = golden_state_dict(golden, 'var/')
    del sd['blocks.1.ffn.fc1.bias']
    sd['blocks.0.attn.extra'] = np.zeros(3, np.float32)
    sd['head.bias'] = np.zeros(65, np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.convert_var(sd, GOLDEN_PATCH_NUMS)
    msg = str(e.value)
    assert '1 missing: blocks_1/ffn/fc1/bias' in msg
    assert '1 unexpected: blocks.0.attn.extra' in msg
    assert 'head.bias: checkpoint (65,), model expects (64,)' in msg


def test_wrong_patch_nums_are_named(golden):
    with pytest.raises(convert.CheckpointMismatchError, match='patch_nums'):
        convert.convert_var(golden_state_dict(golden, 'var/'), (1, 2, 3, 8))
    with pytest.raises(ValueError, match='strictly increasing'):
        convert.convert_var(golden_state_dict(golden, 'var/'), (1, 4, 2, 8))


def test_buffers_are_validated(golden):
    sd = golden_state_dict(golden, 'var/')
    sd['blocks.0.attn.zero_k_bias'] = np.ones_like(sd['blocks.0.attn.zero_k_bias'])
    with pytest.raises(convert.CheckpointMismatchError, match='zero_k_bias'):
        convert.convert_var(sd, GOLDEN_PATCH_NUMS)


def test_head_count_without_l2_norm_is_never_guessed(golden, tmp_path, capsys):
    """Without scale_mul_1H11 no tensor fixes the head count: the converter refuses to guess (the tiny
    golden VAR has 2 heads of width 32; the official-width guess C // 64 would give 1 and wrong logits),
    and --num_heads supplies it."""
    sd = {k: v for k, v in golden_state_dict(golden, 'var/').items() if 'scale_mul' not in k}
    with pytest.raises(convert.CheckpointMismatchError, match='pass num_heads'):
        convert.convert_var(sd, GOLDEN_PATCH_NUMS)
    cfg, params = convert.convert_var(sd, GOLDEN_PATCH_NUMS, num_heads=2)
    assert not cfg['attn_l2_norm'] and cfg['num_heads'] == 2
    one_head = VAR(**dict(cfg, num_heads=1))
    x, labels = golden['var_io/x_BLCv_wo_first_l'], golden['var_io/label_B']
    two, one = VAR(**cfg).apply({'params': params}, labels, x), one_head.apply({'params': params}, labels, x)
    assert np.abs(two - one).max() > 1e-3  # the head count changes the logits: a guess would be silently wrong
    with pytest.raises(convert.CheckpointMismatchError, match='scale_mul_1H11 has 2 heads'):
        convert.convert_var(golden_state_dict(golden, 'var/'), GOLDEN_PATCH_NUMS, num_heads=4)

    torch = pytest.importorskip('torch')
    for part, state in (('vae', golden_state_dict(golden, 'vae/')), ('var', sd)):
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp_path / f'{part}.pth')
    args = ['--vae', str(tmp_path / 'vae.pth'), '--var', str(tmp_path / 'var.pth'), '--patch_nums', '1,2,4,8']
    with pytest.raises(SystemExit) as e:  # the command line: one line, exit code 2
        convert.main(args + ['--out', str(tmp_path / 'guess')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and '--num_heads' in err and 'Traceback' not in err, err
    convert.main(args + ['--out', str(tmp_path / 'out'), '--num_heads', '2'])
    assert json.load(open(tmp_path / 'out' / 'model.json'))['var']['num_heads'] == 2


def test_512_px_schedule_is_detected_from_the_token_count():
    entries, _ = manifest_sections()['d36']
    d36 = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s, _ in entries if k == 'pos_1LC'}
    d16 = {'pos_1LC': np.zeros((1, 680, 8), np.float32)}
    assert d36['pos_1LC'].shape[1] == 2240
    assert convert.default_patch_nums(d36) == convert.PATCH_NUMS_512
    assert convert.default_patch_nums(d16) == convert.default_patch_nums(None) == convert.PATCH_NUMS_256


@pytest.mark.parametrize('share', [0, 1])
def test_phi_sharing_modes_are_inferred(golden, share):
    sd = golden_state_dict(golden, 'vae/')
    phis = {k: sd.pop(k) for k in list(sd) if k.startswith('quantize.quant_resi.')}
    if share == 1:
        sd.update({k.replace('qresi_ls.0', 'qresi'): v for k, v in phis.items() if '.qresi_ls.0.' in k})
    else:
        sd.update({k.replace('qresi_ls.', ''): v for k, v in phis.items()})
    cfg, params = convert.convert_vae(sd, GOLDEN_PATCH_NUMS)
    assert cfg['share_quant_resi'] == share
    assert len(params['quantize']) - 1 == (1 if share == 1 else 4)  # phis + the codebook


def test_pth_files_through_the_command_line(golden, tmp_path):
    torch = pytest.importorskip('torch')
    for part in ('vae', 'var'):
        torch.save(
            {k: torch.from_numpy(np.array(v)) for k, v in golden_state_dict(golden, f'{part}/').items()},
            tmp_path / f'{part}.pth',
        )
    out = tmp_path / 'converted'
    convert.main(
        [
            '--vae',
            str(tmp_path / 'vae.pth'),
            '--var',
            str(tmp_path / 'var.pth'),
            '--out',
            str(out),
            '--patch_nums',
            '1,2,4,8',
        ]
    )
    vqvae, vp, var, tp = api.load_pretrained(str(out))
    logits = api.teacher_forcing_logits(
        vqvae, vp, var, tp, golden['vae_io/img_B3HW'].transpose(0, 2, 3, 1), golden['var_io/label_B']
    )
    np.testing.assert_allclose(logits, golden['var_io/logits_BLV'], atol=1e-4)


def test_missing_torch_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'torch', None)
    with pytest.raises(ImportError, match='pip install torch'):
        convert.load_torch_state_dict(str(tmp_path / 'x.pth'))


def test_load_pretrained_of_a_plain_folder_says_how_to_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match='var_jax.convert'):
        api.load_pretrained(str(tmp_path))


def test_params_saved_per_block_load_stacked(golden, tmp_path):
    """Exports written before the VAR's blocks were stacked (blocks_0, blocks_1, ...) load in today's layout."""
    from var_jax import checkpoint
    from var_jax.models.stacking import unstack_blocks

    cfg, params = convert.convert_var(golden_state_dict(golden, 'var/'), GOLDEN_PATCH_NUMS)
    old = unstack_blocks(params)
    assert 'blocks_0' in old and 'blocks' not in old
    checkpoint.save_pretrained(str(tmp_path / 'old'), {'var': cfg}, {'var': old})
    _, loaded = checkpoint.load_pretrained(str(tmp_path / 'old'))
    jax.tree.map(np.testing.assert_array_equal, loaded['var'], params)


def test_converter_command_line_bad_files_exit_2_with_one_line(golden, tmp_path, capsys):
    """python -m var_jax.convert: a missing file, a file that is not a checkpoint, a checkpoint that is not a
    state dict, the state dict of another model: one line on stderr each, exit code 2, nothing written."""
    torch = pytest.importorskip('torch')
    (tmp_path / 'garbage.pth').write_bytes(b'not a zip or pickle at all')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    torch.save(
        {k: torch.from_numpy(np.array(v)) for k, v in golden_state_dict(golden, 'var/').items()}, tmp_path / 'var.pth'
    )
    cases = {
        'missing.pth': 'not found',
        'garbage.pth': 'not a readable PyTorch checkpoint',
        'list.pth': 'not a state dict',
        'var.pth': 'missing',
    }
    for name, message in cases.items():
        with pytest.raises(SystemExit) as e:
            convert.main(['--vae', str(tmp_path / name), '--out', str(tmp_path / 'out')])
        err = capsys.readouterr().err
        assert e.value.code == 2, (name, err)
        assert err.startswith('error: ') and message in err and 'Traceback' not in err, (name, err)
        assert not os.path.exists(tmp_path / 'out'), name
