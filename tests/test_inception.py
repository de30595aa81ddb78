"""The Flax FID Inception against pytorch-fid's InceptionV3 on the same random weights, and its weights files.

The parity test needs torch, torchvision and pytorch-fid (CI installs them); the rest runs without torch.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import convert
from var_jax.models import inception


def _random_fid_state_dict(seed=0):
    """pytorch-fid's state-dict layout (torchvision's Inception3, 1008 classes, no aux head) with random values.

    BN statistics and affine terms are random too, so a mix-up of scale/bias/mean/var would show; convs are
    He-scaled so that activations neither vanish nor explode through the ~20 layers.
    """
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    model = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith('num_batches_tracked'):
            sd[k] = v
        elif k.endswith('conv.weight'):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith('bn.weight'):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith('running_var'):
            sd[k] = 0.5 + 1.5 * torch.rand(v.shape, generator=g)
        elif k == 'fc.weight':
            sd[k] = torch.randn(v.shape, generator=g) / 2048**0.5
        else:  # bn.bias, running_mean, fc.bias
            sd[k] = 0.2 * torch.randn(v.shape, generator=g)
    return sd


@pytest.fixture(scope='module')
def torch_and_flax(tmp_path_factory):
    """(pytorch-fid InceptionV3 on random weights, its fc, our params converted by the CLI from the same .pth)."""
    torch = pytest.importorskip('torch')
    pytest.importorskip('torchvision')
    pfid = pytest.importorskip('pytorch_fid.inception')
    sd = _random_fid_state_dict()
    path = str(tmp_path_factory.mktemp('inception') / inception.PTH_FILE)
    torch.save(sd, path)
    # pytorch-fid would download the real weights here; hand it the random ones instead.
    mp = pytest.MonkeyPatch()
    mp.setattr(pfid, 'load_state_dict_from_url', lambda *a, **k: torch.load(path, weights_only=True))
    try:
        model = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        mp.undo()
    npz = path.replace('.pth', '.npz')
    convert.main(['--inception', path, '--out', npz])
    return model, (sd['fc.weight'], sd['fc.bias']), inception.load_params(npz)


@pytest.fixture(scope='module')
def flax_forward():
    return jax.jit(lambda p, x: inception.InceptionV3().apply({'params': p}, x))


@pytest.mark.parametrize('side', [256, 32])
def test_matches_pytorch_fid(torch_and_flax, flax_forward, side):
    """pool, logits (with and without bias) and the sFID spatial features agree within 1e-4 relative,
    the input resize to 299 included (256 and 32 px)."""
    import torch

    model, (fc_w, fc_b), params = torch_and_flax
    x = np.random.default_rng(side).uniform(0, 1, (2, side, side, 3)).astype(np.float32)
    captured = {}
    mixed_6d = model.blocks[2][6]  # block 2 = Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e: the graph's mixed_6
    hook = mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))
    with torch.no_grad():
        pool = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))[0].flatten(1)
        unbiased = pool @ fc_w.T
    hook.remove()
    # ADM: mixed_6/conv[..., :7] flattened in TensorFlow's NHWC order.
    spatial = captured['spatial'][:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
    ours = jax.device_get(flax_forward(params, jnp.asarray(x)))
    ref = {'pool': pool, 'logits_unbiased': unbiased, 'logits': unbiased + fc_b, 'spatial': spatial}
    for name, want in ref.items():
        want = want.numpy()
        assert ours[name].shape == want.shape, name
        scale = np.abs(want).max()
        assert scale > 1e-2, f'{name}: degenerate random activations'
        np.testing.assert_allclose(ours[name], want, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_output_shapes_and_params():
    """2048-d pool, 1008 logits, 17*17*7 spatial for any input side; the 23.9M parameters of torchvision's
    InceptionV3 without its auxiliary head, with 1008 classes."""
    params = inception.abstract_params()
    assert sum(x.size for x in jax.tree.leaves(params)) == 23_885_392
    out = jax.eval_shape(
        lambda p, x: inception.InceptionV3().apply({'params': p}, x),
        params,
        jax.ShapeDtypeStruct((3, 48, 40, 3), jnp.float32),
    )
    assert {k: v.shape for k, v in out.items()} == {
        'pool': (3, 2048),
        'logits': (3, 1008),
        'logits_unbiased': (3, 1008),
        'spatial': (3, 17 * 17 * 7),
    }


def test_weights_errors_say_where_to_get_them(tmp_path):
    url = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
    with pytest.raises(inception.InceptionWeightsError, match='inception_path is empty') as e:
        inception.load_params('')
    assert url in str(e.value)
    with pytest.raises(FileNotFoundError, match=url):
        inception.load_params(str(tmp_path / 'nope.npz'))
    with pytest.raises(inception.InceptionWeightsError, match=r'expected the \.npz'):
        inception.load_params(__file__)
    bad = tmp_path / 'lpips.npz'
    np.savez(bad, **{'features.0.weight': np.zeros((64, 3, 3, 3), np.float32)})
    with pytest.raises(inception.InceptionWeightsError, match=r'not the FID Inception \(.*missing') as e:
        inception.load_params(str(bad))
    assert url in str(e.value)
    flat = inception.flatten_params(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), inception.abstract_params()))
    flat['fc/kernel'] = np.zeros((2048, 1000), np.float32)
    np.savez(tmp_path / 'imagenet1000.npz', **flat)
    with pytest.raises(inception.InceptionWeightsError, match=r'mis-shaped: fc/kernel: file \(2048, 1000\)'):
        inception.load_params(str(tmp_path / 'imagenet1000.npz'))


def _torch_layout_zeros():
    """Every key of the FID Inception state dict, in torch names and layouts (OIHW, (out, in)), as zeros."""
    sd = {}
    for k, v in inception.flatten_params(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), inception.abstract_params())
    ).items():
        k = k.replace('/', '.').replace('.kernel', '.weight').replace('.scale', '.weight')
        sd[k] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    return sd


def test_converter_rejects_other_state_dicts(tmp_path, capsys):
    """A torchvision ImageNet Inception (1000 classes, aux head) is not the FID one: one report, with the source."""
    sd = _torch_layout_zeros()
    assert len(jax.tree.leaves(convert.convert_inception(sd))) == len(sd)
    sd['fc.weight'], sd['fc.bias'] = np.zeros((1000, 2048), np.float32), np.zeros((1000,), np.float32)
    sd['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
    with pytest.raises(
        convert.CheckpointMismatchError,
        match='(?s)unexpected: AuxLogits.*mis-shaped: .*fc.weight.*pytorch-fid/releases',
    ):
        convert.convert_inception(sd)
    with pytest.raises(SystemExit) as e:
        convert.main(['--inception', str(tmp_path / inception.PTH_FILE), '--out', str(tmp_path / 'x.npz')])
    assert e.value.code == 2 and 'pytorch-fid/releases' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main(['--inception', 'a.pth', '--vae', 'b.pth', '--out', str(tmp_path / 'x.npz')])
    assert not os.path.exists(tmp_path / 'x.npz')
