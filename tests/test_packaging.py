"""The package installs from pyproject.toml and imports from anywhere, not only from the repository root."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_package_imports_outside_the_repository(tmp_path):
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                    '--target', str(target), REPO], check=True, timeout=300)
    assert (target / 'var_jax' / 'trainers' / 'loop.py').exists() and (target / 'var_jax' / 'data').is_dir()
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ('import var_jax, var_jax.convert, var_jax.trainers, var_jax.data; print(var_jax.__file__); '
            'var_jax.convert.main(["--help"])')
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(target)), proc.stdout  # not the checkout's copy
    assert '--lpips_vgg16' in proc.stdout
