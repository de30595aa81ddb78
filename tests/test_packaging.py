"""The package installs from pyproject.toml and imports from anywhere, not only from the repository root."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_package_imports_outside_the_repository(tmp_path):
    target = tmp_path / 'site'
    subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'install',
            '--quiet',
            '--no-deps',
            '--no-build-isolation',
            '--target',
            str(target),
            REPO,
        ],
        check=True,
        timeout=300,
    )
    assert (target / 'var_jax' / 'trainers' / 'loop.py').exists() and (target / 'var_jax' / 'data').is_dir()
    env = dict(os.environ, PYTHONPATH=str(target))
    code = (
        'import var_jax, var_jax.convert, var_jax.trainers, var_jax.data; print(var_jax.__file__); '
        'var_jax.convert.main(["--help"])'
    )
    proc = subprocess.run(
        [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(target)), proc.stdout  # not the checkout's copy
    assert '--lpips_vgg16' in proc.stdout


def test_device_modules_import_without_tensorflow():
    """A GPU / TPU host may have no TensorFlow (the lent GPU image has none): the models, sampling, the trainers'
    steps, checkpoints, conversion, evaluation and the benchmarks import without it; only the input pipeline
    (var_jax.data) needs it. TensorFlow and TFDS are made unimportable in a fresh interpreter."""
    code = """
import importlib, sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
            raise ImportError('no ' + name + ' here')
sys.meta_path.insert(0, NoTensorFlow())
sys.path.insert(0, 'benchmarks')
for m in ('var_jax.api', 'var_jax.sampling', 'var_jax.generate', 'var_jax.trainers.transformer',
          'var_jax.trainers.tokenizer', 'var_jax.checkpoint', 'var_jax.convert', 'var_jax.evaluation',
          'train', 'eval'):  # two of the benchmarks (each script defines the --config flag: one of those)
    importlib.import_module(m)
try:
    importlib.import_module('var_jax.data.sources')
except ImportError as e:
    print('data needs it:', e)
"""
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'data needs it: no tensorflow' in proc.stdout, proc.stdout  # the blocker works


def _imports(path):
    """(module-level imports, imports anywhere) of a source file, as dotted names ('var_jax.api', 'torch', ...)."""
    import ast

    tree = ast.parse(open(path).read())

    def names(nodes):
        out = set()
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                out |= {n.module} | {f'{n.module}.{a.name}' for a in n.names}
        return out

    return names(tree.body), names(ast.walk(tree))


def test_import_rules_of_the_architecture():
    """docs/ARCHITECTURE.md's import rules, on every module's import statements: models import nothing outside
    models/ but the error classes (var_jax/errors.py, which imports nothing); the sampler and its draws import
    no training, input pipeline or TensorFlow; training imports no command module and not the torch converter;
    torch is imported by convert.py only."""
    root = os.path.join(REPO, 'var_jax')
    broken = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith('.py'):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, REPO)
            _, anywhere = _imports(path)
            ours = {m for m in anywhere if m.startswith('var_jax')}
            if rel.startswith('var_jax/models/'):
                broken += [(rel, m) for m in ours if not m.startswith(('var_jax.models', 'var_jax.errors'))]
            if rel in ('var_jax/sampling.py', 'var_jax/draws.py'):
                broken += [
                    (rel, m)
                    for m in anywhere
                    if m.startswith(('var_jax.trainers', 'var_jax.data', 'tensorflow', 'var_jax.api'))
                ]
            if rel.startswith('var_jax/trainers/'):
                broken += [
                    (rel, m)
                    for m in ours
                    if m.startswith(('var_jax.evaluation', 'var_jax.generate', 'var_jax.convert'))
                ]
            if rel != 'var_jax/convert.py':
                broken += [(rel, m) for m in anywhere if m.split('.')[0] in ('torch', 'torchvision')]
    assert not broken, broken


def test_import_rules_catch_a_violation(tmp_path):
    """The checker above sees a function-level import as well as a module-level one."""
    p = tmp_path / 'm.py'
    p.write_text('import os\n\ndef f():\n    from var_jax import evaluation\n')
    top, anywhere = _imports(str(p))
    assert 'var_jax.evaluation' in anywhere and 'var_jax.evaluation' not in top


def test_code_is_linted_and_formatted():
    """ruff (configured in pyproject.toml) finds nothing to report and nothing to reformat."""
    for args in (['check', '--quiet', '.'], ['format', '--check', '--quiet', '.']):
        proc = subprocess.run([sys.executable, '-m', 'ruff', *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f'ruff {" ".join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}'
