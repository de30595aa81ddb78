"""The notebooks run end to end (nbclient) on a tiny checkpoint converted from the golden weights.

Each notebook is executed in a fresh python3 kernel with VAR_JAX_CKPT pointing at a converted
copy of the official tiny models (tests/data/tiny_public.npz: 32 px, scales 1,2,4,8, 10
classes), so the cells' fallbacks for small models (class ids, top_k) are exercised too. The
editing notebook edits images it samples first; the tokenizer notebook runs twice, on its drawn
patterns from the repository root and on PNG files (VAR_JAX_IMAGES) from notebooks/ with
relative paths and no PYTHONPATH, as in Jupyter. Nothing is written back: the saved
notebooks stay without outputs. Runtime is mostly jit compilation (about 30 s on 2 CPU cores).
"""

import base64
import io
import os

import numpy as np
import pytest

from conftest import GOLDEN_PATCH_NUMS, golden_state_dict

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'notebooks')


@pytest.fixture(scope='module')
def tiny_ckpt(golden, tmp_path_factory):
    """A checkpoint directory like `python -m var_jax.convert --out DIR` writes, of the golden tiny models."""
    from var_jax import checkpoint, convert

    out = str(tmp_path_factory.mktemp('notebooks') / 'tiny_ckpt')
    vae_cfg, vae_params = convert.convert_vae(golden_state_dict(golden, 'vae/'), GOLDEN_PATCH_NUMS)
    var_cfg, var_params = convert.convert_var(golden_state_dict(golden, 'var/'), GOLDEN_PATCH_NUMS)
    checkpoint.save_pretrained(out, {'vae': vae_cfg, 'var': var_cfg}, {'vae': vae_params, 'var': var_params})
    return out


@pytest.fixture(scope='module')
def image_dir(golden, tmp_path_factory):
    """The golden images as PNGs, one enlarged to a non-square size (the notebooks crop and resize)."""
    from PIL import Image

    out = tmp_path_factory.mktemp('images')
    imgs = (np.clip(golden['vae_io/img_B3HW'].transpose(0, 2, 3, 1) * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(imgs[0]).save(out / 'a.png')
    Image.fromarray(imgs[1]).resize((60, 44), Image.BICUBIC).save(out / 'b.png')
    (out / 'notes.txt').write_text('not an image')
    return str(out)


def _run(name, env, monkeypatch, cwd=ROOT):
    """Executes notebooks/<name>.ipynb in cwd; returns the executed notebook.

    From the repository root the kernel gets the root on PYTHONPATH (as the project's commands
    do); from notebooks/ it does not, as when Jupyter is started there: the notebook's first
    cell must then make `import var_jax` and relative paths work by itself.
    """
    if cwd == ROOT:
        monkeypatch.setenv('PYTHONPATH', os.pathsep.join([ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    monkeypatch.setenv('JUPYTER_PLATFORM_DIRS', '1')  # silences jupyter_core's path migration warning
    # Faster XLA compilation (the kernels' runtime is almost all compilation of tiny programs).
    monkeypatch.setenv(
        'XLA_FLAGS', ' '.join([os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with open(os.path.join(NOTEBOOKS, f'{name}.ipynb')) as f:
        nb = nbformat.read(f, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == 'code':
            assert not cell.outputs and cell.execution_count is None, f'{name}.ipynb is saved with outputs: clear them'
    # Appended to the executed copy only: TensorFlow must stay out of the notebooks.
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('tensorflow imported:', 'tensorflow' in sys.modules)"))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': cwd}})
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
    return nb


def _outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == 'code' for out in cell.outputs]


def _assert_ok(nb, min_images):
    outputs = _outputs(nb)
    errors = [o for o in outputs if o.output_type == 'error']
    assert not errors, '\n'.join(f'{o.ename}: {o.evalue}' for o in errors)
    images = [o for o in outputs if 'image/png' in o.get('data', {})]
    assert len(images) >= min_images, f'{len(images)} images displayed, expected >= {min_images}'
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    assert 'tensorflow imported: False' in text, 'the notebook imported TensorFlow (it is only for training input)'
    return text


@pytest.mark.slow
def test_sampling_notebook(tiny_ckpt, monkeypatch):
    nb = _run('sampling', {'VAR_JAX_CKPT': tiny_ckpt}, monkeypatch)
    text = _assert_ok(nb, min_images=3)  # the grid, the cfg=0 grid, the progression
    assert 'classes (columns): [0, 1, 2, 3, 4, 5, 6, 7]' in text


@pytest.mark.slow
def test_zero_shot_editing_notebook(tiny_ckpt, monkeypatch):
    nb = _run('zero_shot_editing', {'VAR_JAX_CKPT': tiny_ckpt}, monkeypatch)  # sources sampled by the model
    _assert_ok(nb, min_images=4)  # the sources, inpainting, outpainting, class-conditional editing


@pytest.mark.slow
def test_tokenizer_notebook(tiny_ckpt, monkeypatch):
    nb = _run('tokenizer', {'VAR_JAX_CKPT': tiny_ckpt}, monkeypatch)  # drawn test patterns
    text = _assert_ok(nb, min_images=2)  # the inputs, the per-scale reconstructions
    assert 'PSNR (dB) after each scale' in text and 'perplexity' in text


@pytest.mark.slow
def test_tokenizer_notebook_from_notebooks_dir_with_png_files(tiny_ckpt, image_dir, monkeypatch):
    """Run like Jupyter started in notebooks/: relative paths, no PYTHONPATH; PNG inputs of any size."""
    env = {'VAR_JAX_CKPT': os.path.relpath(tiny_ckpt, ROOT), 'VAR_JAX_IMAGES': os.path.relpath(image_dir, ROOT)}
    nb = _run('tokenizer', env, monkeypatch, cwd=NOTEBOOKS)
    _assert_ok(nb, min_images=2)
    from PIL import Image

    first = next(o for o in _outputs(nb) if 'image/png' in o.get('data', {}))
    width = Image.open(io.BytesIO(base64.b64decode(first['data']['image/png']))).width
    assert width == 2 * (4 * 32 + 2) + 2, 'expected the 2 PNG files (notes.txt skipped) in one row, tiles 4x enlarged'
