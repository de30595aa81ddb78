"""The LPIPS-VGG perceptual loss: parity with an independent PyTorch computation, the weight
loaders and their errors, and the perceptual term of both tokenizer steps. Random weights only."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from var_jax import trainers
from var_jax.models import lpips
from var_jax.models.discriminator import PatchDiscriminator
from var_jax.models.vqvae import VQVAE
from var_jax.trainers import loop, tokenizer

from train_worker import _host_init as host_init

L1, L2, WEIGHT = 0.2, 1.0, 0.5


def random_state_dict(seed=0):
    """torch-keyed random tensors of the real shapes: He-scaled convs (activations neither vanish nor
    blow up over 13 layers), small biases, non-negative linear layers (as the trained ones)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in lpips.vgg16_torch_shapes().items():
        fan_in = np.prod(shape[1:])
        sd[key] = rng.normal(0, np.sqrt(2 / fan_in), shape) if len(shape) == 4 else rng.normal(0, 0.1, shape)
    for key, shape in lpips.lin_torch_shapes().items():
        sd[key] = rng.uniform(0, 0.2, shape)
    return {k: v.astype(np.float32) for k, v in sd.items()}


@pytest.fixture(scope='module')
def state_dict():
    return random_state_dict()


@pytest.fixture(scope='module')
def npz_path(state_dict, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('lpips') / 'lpips_vgg.npz')
    np.savez(path, **state_dict)
    return path


@pytest.fixture(scope='module')
def params(npz_path):
    return lpips.load_lpips_params(npz_path)


@pytest.fixture(scope='module')
def distance():
    return jax.jit(lambda p, x, y: lpips.LPIPS().apply({'params': p}, x, y))


def _images(shape, seed):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1, maxval=1)


# --- the distance ---------------------------------------------------------------------------------
def torch_lpips(state_dict, x, y):
    """LPIPS-VGG in plain PyTorch, written from the reference (lpips/lpips.py, pretrained_networks.py):
    torchvision's VGG16 `features` as its config 'D' builds it, taps after features 3, 8, 15, 22, 29."""
    torch = pytest.importorskip('torch')
    nn = torch.nn
    layers, cin = [], 3
    for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'):
        if v == 'M':
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    features = nn.Sequential(*layers)
    features.load_state_dict(
        {k[len('features.') :]: torch.from_numpy(v) for k, v in state_dict.items() if k.startswith('features.')},
        strict=True,
    )
    lins = [nn.Conv2d(c, 1, 1, bias=False) for c in lpips.WIDTHS]
    for k, lin in enumerate(lins):
        lin.weight.data = torch.from_numpy(state_dict[f'lin{k}.model.1.weight'])
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h, out = (torch.from_numpy(np.array(img)).permute(0, 3, 1, 2) - shift) / scale, []
        for i, layer in enumerate(features[:30]):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out

    def unit(t):
        return t / (torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + 1e-10)

    with torch.no_grad():
        total = 0
        for k, (a, b) in enumerate(zip(taps(x), taps(y))):
            total = total + lins[k]((unit(a) - unit(b)) ** 2).mean([2, 3], keepdim=True)
    return total.reshape(-1).numpy()


def test_parity_with_pytorch_through_the_pth_converter(state_dict, tmp_path, distance):
    torch = pytest.importorskip('torch')
    from var_jax import convert

    # The two files as their owners ship them: torchvision's (with a classifier we do not use) and lpips'.
    vgg_file = {k: torch.from_numpy(v) for k, v in state_dict.items() if k.startswith('features.')}
    vgg_file['classifier.6.bias'] = torch.zeros(1000)
    torch.save(vgg_file, tmp_path / lpips.VGG16_FILE)
    torch.save(
        {k: torch.from_numpy(v) for k, v in state_dict.items() if k.startswith('lin')}, tmp_path / lpips.LIN_FILE
    )
    out = tmp_path / 'converted' / 'lpips_vgg.npz'
    convert.main(
        [
            '--lpips_vgg16',
            str(tmp_path / lpips.VGG16_FILE),
            '--lpips_lin',
            str(tmp_path / lpips.LIN_FILE),
            '--out',
            str(out),
        ]
    )
    # The .npz keeps exactly the tensors LPIPS needs (the classifier is dropped).
    assert sorted(np.load(out).files) == sorted(lpips.vgg16_torch_shapes()) + sorted(lpips.lin_torch_shapes())
    params = lpips.load_lpips_params(str(out))

    x = _images((3, 32, 32, 3), 1)
    y = jnp.clip(x + 0.3 * _images((3, 32, 32, 3), 2), -1, 1)
    got = np.asarray(distance(params, x, y))
    want = torch_lpips(state_dict, x, y)
    assert got.shape == (3,) and np.all(want > 1e-3), want
    rel = np.max(np.abs(got - want) / want)
    print(f'LPIPS parity: ours {got}, torch {want}, max relative difference {rel:.2e}')
    assert rel < 1e-5


def test_distance_to_itself_is_zero_with_finite_gradients(params, distance):
    x, y = _images((2, 16, 16, 3), 3), _images((2, 16, 16, 3), 4)
    d = distance(params, x, y)
    assert d.shape == (2,) and np.all(d > 1e-3), d
    # XLA may evaluate the two (identical) VGG passes in different orders: zero up to rounding (~3e-16).
    np.testing.assert_allclose(distance(params, x, x), 0.0, atol=1e-12)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(lpips.LPIPS().apply({'params': params}, a, b))))
    assert np.all(np.isfinite(grad(x, x)))
    # A black image: in the first blocks whole feature vectors are zero (ReLU), the gradient stays finite.
    assert np.all(np.isfinite(grad(-jnp.ones_like(x), y)))


def test_too_small_images_are_named(params):
    with pytest.raises(ValueError, match='at least 16 px'):
        lpips.LPIPS().apply({'params': params}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))


# --- loading errors ---------------------------------------------------------------------------------
def test_missing_files_are_named_with_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lpips.load_lpips_params(str(tmp_path / 'nope.npz'))
    assert 'nope.npz not found' in str(e.value)
    assert 'https://download.pytorch.org/models/vgg16-397923af.pth' in str(e.value)
    assert 'lpips/weights/v0.1/vgg.pth' in str(e.value) and 'python -m var_jax.convert --lpips_vgg16' in str(e.value)
    with pytest.raises(lpips.LPIPSWeightsError, match='is a directory; perceptual_weights_path takes one .npz'):
        lpips.load_lpips_params(str(tmp_path))
    from var_jax import convert

    (tmp_path / lpips.VGG16_FILE).write_bytes(b'')  # only one of the two files
    with pytest.raises(FileNotFoundError, match=re.escape(f'{tmp_path / lpips.LIN_FILE} not found')):
        convert.convert_lpips(str(tmp_path / lpips.VGG16_FILE), str(tmp_path / lpips.LIN_FILE), str(tmp_path / 'o.npz'))


def test_missing_key_and_wrong_shape_are_named(state_dict, tmp_path):
    missing = dict(state_dict)
    del missing['lin3.model.1.weight']
    np.savez(tmp_path / 'missing.npz', **missing)
    with pytest.raises(
        lpips.LPIPSWeightsError, match=r'missing\.npz does not hold.*\n  1 missing: lin3\.model\.1\.weight'
    ):
        lpips.load_lpips_params(str(tmp_path / 'missing.npz'))
    shaped = dict(state_dict, **{'features.28.weight': np.zeros((512, 256, 3, 3), np.float32)})
    np.savez(tmp_path / 'shaped.npz', **shaped)
    with pytest.raises(
        lpips.LPIPSWeightsError,
        match=r'mis-shaped: features\.28\.weight: file \(512, 256, 3, 3\), expected \(512, 512, 3, 3\)',
    ):
        lpips.load_lpips_params(str(tmp_path / 'shaped.npz'))
    (tmp_path / 'text.npz').write_text('not an archive')
    with pytest.raises(lpips.LPIPSWeightsError, match='text.npz is not the LPIPS .npz'):
        lpips.load_lpips_params(str(tmp_path / 'text.npz'))


def test_wrong_pth_file_is_named(state_dict, tmp_path):
    torch = pytest.importorskip('torch')
    from var_jax import convert

    vgg = {k: torch.from_numpy(v) for k, v in state_dict.items() if k.startswith('features.')}
    vgg_path, lin_path, out = tmp_path / lpips.VGG16_FILE, tmp_path / lpips.LIN_FILE, str(tmp_path / 'o.npz')
    torch.save(vgg, vgg_path)
    torch.save(vgg, lin_path)  # the VGG weights twice: no linear layers
    with pytest.raises(lpips.LPIPSWeightsError, match=r'vgg\.pth does not hold.*\n  5 missing: lin0\.model\.1\.weight'):
        convert.convert_lpips(str(vgg_path), str(lin_path), out)
    lin_path.write_bytes(b'')  # truncated
    with pytest.raises(lpips.LPIPSWeightsError, match=r'vgg\.pth is not a readable PyTorch state dict'):
        convert.convert_lpips(str(vgg_path), str(lin_path), out)
    assert not os.path.exists(out)


# --- the tokenizer steps --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def setup():
    """A 16 px tokenizer (LPIPS needs 16 px) and a discriminator, params made on the host (no init compile)."""
    vqvae = VQVAE(
        vocab_size=32,
        z_channels=8,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        patch_nums=(1, 2, 4, 8),
        using_sa=False,
        using_mid_sa=False,
    )
    disc = PatchDiscriminator(ndf=8, n_layers=1)
    image = _images((2, 16, 16, 3), 5)
    tx, dtx = optax.adam(1e-3), tokenizer.make_disc_optimizer(1e-3)
    abstract = lambda model: jax.eval_shape(model.init, jax.random.PRNGKey(0), image)['params']
    disc_params = host_init(abstract(disc), 1, std=0.02)
    state = loop.new_state(host_init(abstract(vqvae), 0), tx, 0) | {
        'disc_params': disc_params,
        'disc_opt_state': dtx.init(disc_params),
    }
    return vqvae, disc, tx, dtx, state, {'image': image}


def _step_kw(setup, gan):
    _, disc, _, dtx, _, _ = setup
    return {'disc': disc, 'disc_tx': dtx, 'disc_weight': 0.5, 'disc_start': 0} if gan else {}


def _state(setup, gan):
    return {k: v for k, v in setup[4].items() if gan or not k.startswith('disc_')}


@pytest.fixture(scope='module')
def reference(setup, params):
    """The terms of both steps, written out here and jitted once: l1 * L1 + l2 * L2 + weight * mean LPIPS
    (VQGAN's nll), the VQ loss, the generator's adversarial loss g, the reconstruction, and the norms of the
    gradients of nll and g w.r.t. the decoder's last layer."""
    vqvae, disc, _, _, state, batch = setup
    x = batch['image']
    rec_of = lambda p: vqvae.apply({'params': p}, x)[0]
    nll = lambda p: (
        L1 * jnp.mean(jnp.abs(rec_of(p) - x))
        + L2 * jnp.mean(jnp.square(rec_of(p) - x))
        + WEIGHT * jnp.mean(lpips.LPIPS().apply({'params': params}, rec_of(p), x))
    )
    vq = lambda p: vqvae.apply({'params': p}, x)[1]
    g = lambda p: -jnp.mean(disc.apply({'params': state['disc_params']}, rec_of(p)))
    last = lambda grads: jnp.linalg.norm(grads['decoder']['conv_out']['kernel'])
    terms = jax.jit(
        lambda p: dict(rec=rec_of(p), nll=nll(p), vq=vq(p), g=g(p), gn=last(jax.grad(nll)(p)), gg=last(jax.grad(g)(p)))
    )
    return terms(state['params'])


@pytest.mark.parametrize('gan', [False, True], ids=['plain', 'gan'])
def test_step_adds_the_weighted_perceptual_term(setup, params, distance, reference, gan):
    vqvae, disc, tx, _, _, batch = setup
    state, kw = _state(setup, gan), _step_kw(setup, gan)
    on = tokenizer.make_step(vqvae, tx, L1, L2, **kw, perceptual=lpips.LPIPS(), perceptual_weight=WEIGHT)
    _, m = jax.jit(on)(state, params, batch)
    r = reference
    np.testing.assert_allclose(m['perceptual'], jnp.mean(distance(params, r['rec'], batch['image'])), rtol=1e-6)
    assert m['perceptual'] > 0
    if not gan:
        np.testing.assert_allclose(m['loss'], r['nll'] + r['vq'], rtol=1e-5)
        return
    # VQGAN: the perceptual term is part of the nll whose decoder-gradient norm the adaptive weight balances.
    w = 0.5 * r['gn'] / (r['gg'] + 1e-4)
    np.testing.assert_allclose(m['disc_weight_adaptive'], w, rtol=1e-4)
    np.testing.assert_allclose(m['loss'], r['nll'] + w * r['g'] + r['vq'], rtol=1e-5)


@pytest.mark.parametrize('gan', [False, True], ids=['plain', 'gan'])
def test_weight_zero_is_the_program_without_lpips(setup, gan):
    """perceptual_weight 0: no VGG in the program, the step takes no LPIPS params."""
    vqvae, _, tx, _, _, batch = setup
    state, kw = _state(setup, gan), _step_kw(setup, gan)
    off = tokenizer.make_step(vqvae, tx, L1, L2, **kw, perceptual=lpips.LPIPS(), perceptual_weight=0.0)
    default = tokenizer.make_step(vqvae, tx, L1, L2, **kw)
    assert str(jax.make_jaxpr(off)(state, batch)) == str(jax.make_jaxpr(default)(state, batch))
    with pytest.raises(ValueError, match='needs an LPIPS module'):
        tokenizer.make_step(vqvae, tx, L1, L2, **kw, perceptual_weight=0.1)


# --- the config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'path,error,named',
    [('', ValueError, 'tokenizer.perceptual_weights_path'), ('absent.npz', FileNotFoundError, 'absent.npz')],
)
def test_enabled_without_weights_fails_before_training(tmp_path, path, error, named):
    from configs import var_small

    config = var_small.get_config()
    config.data.data_dir = str(tmp_path / 'data')
    config.tokenizer.perceptual_weight = 0.1
    config.tokenizer.perceptual_weights_path = path and str(tmp_path / path)
    with pytest.raises(error, match=named) as e:
        trainers.run(config, str(tmp_path / 'work'))
    assert 'download.pytorch.org' in str(e.value)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written: no data, no workdir
