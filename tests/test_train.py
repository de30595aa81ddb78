"""Tests for var_jax.optim and var_jax.trainers: the official recipe (train.py), the steps, the loop, resume, errors.

The expensive parts run as subprocesses on the session's background lane (tests/conftest.py), from the
start of the session, while the tests of the other modules and the cheap in-process tests here run:

* tests/train_worker.py `sharded` (4 simulated CPU devices): transformer.make_step on 1 device, 4-way data
  parallel and FSDP 2 / 4, the non-finite guard, a progressive stage's truncated step against the masked
  full one, and a 4-device checkpoint for a 1-device restore.
* the kill-and-resume chains: `main.py` run A to the end; run B in another workdir paused right
  after a checkpoint, SIGKILLed (or SIGTERMed), then the same main.py command again to completion.
  Three variants (RESUME_RUNS): both stages killed in the transformer stage; a tokenizer-only run with
  the discriminator on, killed in the tokenizer stage; the same tokenizer run preempted by SIGTERM there.
  One run A per config.

Only the jobs that the selected tests need are started. The subprocesses share a persistent JAX
compilation cache (in pytest's cache dir), so run B reuses run A's executables: the comparison of
A and B then isolates what resume restores (state, data position, rng) from compilation. The Ctrl-C
test's main.py (the tokenizer of run A, interrupted) runs after run A and loads its executables too.
"""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

import train_worker
from conftest import ENVIRON, golden_state_dict
from var_jax import optim, trainers
from var_jax.trainers import loop, transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900

# A tiny configs/var_small.py run: 8 px images, 3 scales, 12 steps per stage.
TINY = {
    'data.image_size': 8, 'data.synthetic_train_size': 64, 'data.synthetic_test_size': 16,
    'vae.ch': 32, 'vae.ch_mult': (1, 2), 'vae.num_res_blocks': 1, 'vae.vocab_size': 64, 'vae.z_channels': 8,
    'vae.patch_nums': (1, 2, 4),
    'var.depth': 2, 'var.embed_dim': 64, 'var.num_heads': 2, 'var.drop_path_rate': 0.1,
    'tokenizer.total_steps': 12, 'tokenizer.batch_size': 8, 'tokenizer.optim.warmup_steps': 2,
    'transformer.total_steps': 12, 'transformer.batch_size': 8, 'transformer.optim.warmup_steps': 2,
    'save_every': 4, 'log_every': 4, 'sample_every': 1000, 'eval.val_batches': 1,
    'sample.num_images': 4, 'sample.ncols': 4, 'sample.batch_size': 4,
}
PAUSE_AT = 6  # run B is killed after step 6 of a stage: checkpoint 4 is on disk, steps 5-6 are lost
# Kill-and-resume variants: the stage whose step PAUSE_AT the kill lands after, config overrides on TINY.
# (Their names are in the workdir paths, which error messages quote: no config field names.)
# The signal is SIGKILL (steps after checkpoint 4 are lost) or SIGTERM (a preemption notice: the run saves
# after the step that is running and exits with code 75). Variants with the same overrides share run A.
# The discriminator trains from step 3 (disc_start 2), so its params and Adam state at the checkpoint
# a resume starts from (4, or 7 after SIGTERM) are not the initial ones.
GAN_TOKENIZER = {'stages': 'tokenizer', 'tokenizer.disc_weight': 0.5, 'tokenizer.disc_start': 2,
                 'tokenizer.disc_layers': 1, 'tokenizer.disc_ndf': 8}
RESUME_RUNS = {
    'full_run': ('transformer', {}, signal.SIGKILL),   # both stages
    'gan_tokenizer': ('tokenizer', GAN_TOKENIZER, signal.SIGKILL),
    'preempted_tokenizer': ('tokenizer', GAN_TOKENIZER, signal.SIGTERM),
}
EXIT_PREEMPTED = 75  # main.py's exit code for a clean, resumable stop on SIGTERM


def _cli(value):
    return '(' + ','.join(map(str, value)) + ')' if isinstance(value, tuple) else str(value)


def main_flags(workdir, data_dir, **extra):
    overrides = dict(TINY, **{'data.data_dir': data_dir}, **extra)
    return (['--config=configs/var_small.py', f'--workdir={workdir}']
            + [f'--config.{k}={_cli(v)}' for k, v in overrides.items()])


def small_config(data_dir, **extra):
    """configs/var_small.py with the TINY overrides (as main.py's flags would set them)."""
    from configs import var_small
    config = var_small.get_config()
    for key, value in dict(TINY, **{'data.data_dir': data_dir}, **extra).items():
        *parents, leaf = key.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _env(cache_dir, devices=None):
    env = dict(ENVIRON, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
               PYTHONPATH=REPO + os.pathsep + ENVIRON.get('PYTHONPATH', ''),
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_COMPILATION_CACHE_MAX_SIZE=str(2 ** 28))
    if devices:
        env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}').strip()
    return env


def _tail(path, n=6000):
    try:
        with open(path, errors='replace') as f:
            return f.read()[-n:]
    except OSError:
        return '<no log>'


class _Proc:
    """A subprocess of ours with its output in a log file."""

    def __init__(self, args, log, env):
        self.log = log
        with open(log, 'w') as f:
            self.p = subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

    def wait(self, timeout=TIMEOUT_S):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f'{self.log}: timed out after {timeout} s\n{_tail(self.log)}')

    def check(self):
        rc = self.wait()
        assert rc == 0, f'{self.log}: exit code {rc}\n{_tail(self.log)}'

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()  # SIGKILL, by our own handle
            self.p.wait()


class _Background:
    """The module's subprocesses: started once, waited on by the tests that need them."""

    def __init__(self, base, cache_dir):
        self.base, self.cache_dir = base, cache_dir
        self.procs, self.sharded_future, self.runs = [], None, {}
        self.lock, self.closing = threading.Lock(), False

    def _start(self, args, log, env):
        with self.lock:  # close() kills every process started before it, and no later one starts
            assert not self.closing, 'tests are over'
            proc = _Proc(args, os.path.join(self.base, log), env)
            self.procs.append(proc)
            return proc

    def run_sharded(self):
        """The `sharded` worker (a background job): (its result.json, its output directory)."""
        out = os.path.join(self.base, 'sharded')
        os.makedirs(out)
        self._start([sys.executable, os.path.join(REPO, 'tests', 'train_worker.py'), 'sharded', out], 'sharded.log',
                    _env(self.cache_dir, devices=4)).check()
        with open(os.path.join(out, 'result.json')) as f:
            return json.load(f), out

    # -- kill and resume -------------------------------------------------------------------------
    def start_resume_chain(self, variants, jobs):
        """variants: {RESUME_RUNS name: also run B}. The variants of one config run one after another in
        one background job (its first run A serves them all); the configs' jobs run in lane order, all but
        the first once the first run A has generated the synthetic dataset they all read."""
        self.data_dir = os.path.join(self.base, 'data')
        self.data_ready = threading.Event()
        self.runs, groups = {}, {}
        for v in RESUME_RUNS:
            if v in variants:
                group = groups.setdefault(json.dumps(RESUME_RUNS[v][1], sort_keys=True), [])
                self.runs[v] = _ResumeRuns(self.base, v, a_owner=self.runs[group[0]] if group else None)
                group.append(v)

        def chain(names, makes_data):
            if not makes_data:
                self.data_ready.wait(TIMEOUT_S)
            for v in names:
                self._chain(self.runs[v], with_b=variants[v], makes_data=makes_data)
        for i, names in enumerate(groups.values()):
            jobs.submit(chain, names, i == 0)

    def _main(self, runs, name, *, paused=False):
        """Run `name` (A, B1 or B2) of `runs` in its workdir (A or B)."""
        flags = main_flags(runs.workdirs[name[0]], self.data_dir, **runs.overrides)
        args = ([os.path.join(REPO, 'tests', 'train_worker.py'), 'main_paused', runs.stage, str(PAUSE_AT)] if paused
                else [os.path.join(REPO, 'main.py')])
        return self._start([sys.executable] + args + flags, runs.log(name), _env(self.cache_dir))

    def _chain(self, runs, with_b, makes_data):
        try:
            if runs.a_owner is None:
                a = self._main(runs, 'A')
                while makes_data and a.p.poll() is None and 'step 0/' not in _tail(a.log, 10 ** 7):
                    time.sleep(0.2)  # fit prints its first step once the data is there
                self.data_ready.set()
                a.check()
            else:  # run A of the same config, earlier in this chain
                assert runs.a_owner.a_done.is_set() and runs.a_owner.a_error is None, (
                    f'run A of {runs.a_owner.variant} failed: {runs.a_owner.a_error}')
            runs.a_done.set()
            if not with_b:
                return
            b1 = self._main(runs, 'B1', paused=True)
            marker = os.path.join(runs.workdirs['B'], runs.stage, 'checkpoints', '4', 'commit_success.txt')
            deadline = time.time() + TIMEOUT_S
            while not (os.path.exists(marker) and f'PAUSED at step {PAUSE_AT}' in _tail(b1.log, 10 ** 7)):
                assert b1.p.poll() is None, f'run B exited before the kill:\n{_tail(b1.log)}'
                assert time.time() < deadline, f'run B never paused:\n{_tail(b1.log)}'
                time.sleep(0.1)
            if runs.signal == signal.SIGKILL:
                b1.kill()
            else:
                b1.p.send_signal(runs.signal)
                b1.wait()
            runs.b1_returncode = b1.p.returncode
            self._main(runs, 'B2').check()
        except BaseException as e:  # reported by the tests that wait on the chain
            runs.error = e
            if not runs.a_done.is_set():
                runs.a_error = e
        finally:
            self.data_ready.set()
            runs.a_done.set()
            runs.b_done.set()

    def wait(self, runs, event):
        assert event.wait(2 * TIMEOUT_S * len(self.runs)), 'background runs timed out'
        if runs.error is not None and (event is runs.b_done or not os.path.isdir(
                os.path.join(runs.workdirs['A'], 'export'))):
            raise AssertionError(f'background runs {runs.variant} failed: {runs.error}')

    def close(self):
        with self.lock:
            self.closing = True
        for proc in self.procs:
            proc.kill()


class _ResumeRuns:
    """One RESUME_RUNS variant: workdirs A and B (B1 killed, B2 resumed), logs, completion events."""

    def __init__(self, base, variant, a_owner=None):
        self.variant, self.base, self.a_owner = variant, base, a_owner
        self.stage, self.overrides, self.signal = RESUME_RUNS[variant]
        self.stages = self.overrides.get('stages', 'tokenizer,transformer').split(',')  # var_small's default
        self.workdirs = {name: os.path.join(base, f'{variant}_{name}') for name in ('A', 'B')}
        if a_owner is not None:  # the same config: one run A
            self.workdirs['A'] = a_owner.workdirs['A']
        self.a_done, self.b_done = threading.Event(), threading.Event()
        self.error = self.a_error = self.b1_returncode = None

    def log(self, run):
        return f'{self.variant}_{run}.log'


def _resume_variants(items):
    """{RESUME_RUNS variant: whether its run B is needed} for the selected tests."""
    wanted = {}
    for item in items:
        if 'resumed_runs' in item.fixturenames:
            wanted[item.callspec.params['resumed_runs']] = True
        elif 'finished_run' in item.fixturenames:
            wanted.setdefault('full_run', False)
    return wanted


_STARTED = {}  # 'background': the module's _Background, made by start_background


def start_background(jobs, items, tmp_path_factory, config):
    """conftest's background_jobs calls this before the first test of the session: the subprocesses the
    selected tests need (items) run on its background lane while the other modules' tests run."""
    try:
        cache_dir = str(config.cache.mkdir('var_jax_test_train_jax_cache'))
    except AttributeError:  # -p no:cacheprovider
        cache_dir = str(tmp_path_factory.mktemp('jax_cache'))
    background = _STARTED['background'] = _Background(str(tmp_path_factory.mktemp('train')), cache_dir)
    jobs.on_close(background.close)
    needs = {name for item in items for name in item.fixturenames}
    if 'sharded' in needs:
        background.sharded_future = jobs.submit(background.run_sharded)
    if needs & {'finished_run', 'resumed_runs'}:
        background.start_resume_chain(_resume_variants(items), jobs)


@pytest.fixture(scope='module')
def background():
    assert 'background' in _STARTED, 'tests/conftest.py (background_jobs) starts the subprocesses'
    yield _STARTED['background']
    _STARTED.pop('background').close()  # whatever still runs


@pytest.fixture(scope='module')
def sharded(background):
    return background.sharded_future.result()


@pytest.fixture(scope='module')
def finished_run(background):
    """Workdir of run A (both stages to the end), and the data dir it generated."""
    runs = background.runs['full_run']
    background.wait(runs, runs.a_done)
    return runs.workdirs['A'], background.data_dir


@pytest.fixture(scope='module', params=list(RESUME_RUNS))
def resumed_runs(request, background):
    """A RESUME_RUNS variant's runs A and B, both finished."""
    runs = background.runs[request.param]
    background.wait(runs, runs.b_done)
    return runs


# =============================================================================================
# 1. Golden: loss and gradients of the official code through transformer.var_loss
# =============================================================================================
@pytest.fixture(scope='module')
def golden_grad(golden, tiny):
    """jitted (params, x, token_weights) -> ((loss, (ce, correct)), grads) of transformer.var_loss, eval mode."""
    _, _, var, params = tiny
    labels, targets = golden['var_io/label_B'], golden['vae_io/idx_BL']

    @jax.jit
    def fn(params, x, weights):
        return jax.value_and_grad(lambda p: transformer.var_loss(var, p, labels, x, targets, weights, train=False),
                                  has_aux=True)(params)
    return var, params, fn


def test_var_loss_and_grads_match_official(golden, golden_grad):
    from var_jax import convert
    var, params, fn = golden_grad
    L = golden['vae_io/idx_BL'].shape[1]
    (loss, (ce, _)), grads = fn(params, golden['var_io/x_BLCv_wo_first_l'], np.full(L, 1 / L, np.float32))
    np.testing.assert_allclose(loss, golden['train/loss'], rtol=1e-4)
    np.testing.assert_allclose(np.mean(ce), golden['train/loss'], rtol=1e-4)
    ref = convert.state_dict_to_params(golden_state_dict(golden, 'train/grad/'), jax.eval_shape(lambda: params),
                                       convert._VAR_BUFFERS)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == len(flat_ref) > 20
    for path, g in flat:
        r = np.asarray(flat_ref[path])
        assert np.abs(r).max() > 0, jax.tree_util.keystr(path)
        err = np.abs(np.asarray(g) - r).max()
        assert err <= 1e-4 * np.abs(r).max(), f'{jax.tree_util.keystr(path)}: max error {err}'


def test_label_smoothing_is_torchs():
    """torch CrossEntropyLoss(label_smoothing=e): (1 - e) * CE + e * mean over classes of -log p,
    weighted by token and averaged over the batch (on given logits: a stub stands in for the VAR)."""
    rng = np.random.default_rng(0)
    B, L, V, eps = 3, 5, 7, 0.1
    logits = rng.normal(size=(B, L, V)) * 3
    targets = rng.integers(0, V, (B, L))
    weights = rng.uniform(0, 1, L).astype(np.float32)

    class Stub:
        def apply(self, variables, labels, x, train=False, rngs=None):
            return jnp.asarray(logits, jnp.float32)

    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    for e in (0.0, eps):
        ce = (1 - e) * nll + e * -logp.mean(-1)
        loss, (got_ce, correct) = transformer.var_loss(Stub(), {}, None, None, targets, weights, label_smoothing=e)
        np.testing.assert_allclose(loss, (ce * weights).sum(-1).mean(), rtol=1e-5)
        np.testing.assert_allclose(got_ce, ce, rtol=1e-5)
        np.testing.assert_array_equal(correct, logits.argmax(-1) == targets)


def test_masked_scales_equal_truncation(golden, golden_grad):
    """Zero weights after scale si (progressive training) equal truncating the sequence: the loss and
    every gradient ignore the inputs of the later scales (block-causal attention)."""
    var, params, fn = golden_grad
    x = golden['var_io/x_BLCv_wo_first_l']
    ed, L = sum(p * p for p in var.patch_nums[:3]), sum(p * p for p in var.patch_nums)
    cut = transformer.progressive_token_weights(var.patch_nums, 0, 100, 10, pg=0.5, pg0=2, pgwp_steps=1)
    assert cut.shape == (ed,) and cut.min() > 0
    w = np.pad(cut, (0, L - ed))  # the masked full-length form of the stage
    x2 = x.copy()
    x2[:, ed - 1:] = np.random.default_rng(0).normal(size=x2[:, ed - 1:].shape)  # inputs of tokens >= ed
    (l1, _), g1 = fn(params, x, w)
    (l2, _), g2 = fn(params, x2, w)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), g1, g2)
    full = np.full_like(w, 1 / len(w))  # without the mask the perturbation is seen
    (l3, _), _ = fn(params, x, full)
    (l4, _), _ = fn(params, x2, full)
    assert abs(float(l3) - float(l4)) > 1e-3


# =============================================================================================
# 2. Schedules, weight-decay groups, AdamW
# =============================================================================================
def official_lr(it, peak, wp_it, max_it, wp0, wpe, sche='lin0'):
    """utils/lr_control.lr_wd_annealing of the official code (lin0 and lin<T>)."""
    if it < wp_it:
        cur = wp0 + (1 - wp0) * it / wp_it
    else:
        pasd = (it - wp_it) / (max_it - 1 - wp_it)
        rest = 1 - pasd
        if sche == 'lin0':
            cur = 1 if pasd < 0.05 else wpe + (1 - wpe) * rest / 0.95
        else:  # 'lin<T>', which the official train.py uses when --pg > 0
            T = float(sche[3:])
            mid = (1 + wpe + (1 - wpe) * (1 - T)) / 2
            cur = 1 + (mid - 1) * pasd / T if pasd < T else wpe + (mid - wpe) * rest / (1 - T)
    return cur * peak


def official_wd(it, wd, wd_end, max_it):
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / (max_it - 1)))


@pytest.mark.parametrize('total,warmup,wp0,wpe', [(1000, 50, 0.005, 0.1), (100, 0, 0.005, 0.01),
                                                  (37, 5, 0.1, 0.05), (20, 17, 0.005, 0.5)])
def test_lin0_schedule_matches_official(total, warmup, wp0, wpe):
    sched = jax.jit(optim.lr_schedule(3e-4, total, warmup, wp0, wpe))
    steps = np.arange(total)
    got = np.asarray(jax.vmap(sched)(steps))
    want = np.array([official_lr(s, 3e-4, warmup, total, wp0, wpe) for s in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)


@pytest.mark.parametrize('wd,wd_end,total', [(0.05, 0.05, 100), (0.05, 0.08, 1000), (0.1, 0.0, 7)])
def test_cosine_wd_matches_official(wd, wd_end, total):
    sched = optim.cosine_wd_schedule(wd, wd_end, total)
    got = np.array([float(sched(s)) for s in range(total)])
    want = np.array([official_wd(s, wd, wd_end, total) for s in range(total)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose([got[0], got[-1]], [wd, wd_end], rtol=1e-6, atol=1e-9)


def _optim(**kw):
    base = dict(tblr=1e-4, warmup_steps=5, wp0=0.005, wpe=0.1, wd=0.05, wd_end=0.08, clip=2.0, beta1=0.9, beta2=0.95)
    return ml_collections.ConfigDict(dict(base, **kw))


def _hyperparams_per_step(tx, n):
    """(lr, wd) that tx applies at updates 0..n-1 (zero gradients on a toy tree)."""
    params = {'w': jnp.ones((2, 3)), 'b': jnp.ones((3,))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []  # one compile, then n cheap calls
    for _ in range(n):
        _, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
        # inject_hyperparams keeps the values of the update it just applied.
        (inject,) = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'hyperparams'))
                     if hasattr(s, 'hyperparams')]
        out.append([float(inject.hyperparams['learning_rate']), float(inject.hyperparams['weight_decay'])])
    return np.array(out)


def test_make_optimizer_wires_the_official_schedules():
    """lr = tblr * batch / 256 with 'lin0', cosine wd, as applied update by update."""
    cfg, total, batch = _optim(), 30, 768
    got = _hyperparams_per_step(optim.make_optimizer(cfg, total, batch), total)
    peak = 1e-4 * 768 / 256
    np.testing.assert_allclose(got[:, 0], [official_lr(s, peak, 5, total, 0.005, 0.1) for s in range(total)], rtol=2e-6)
    np.testing.assert_allclose(got[:, 1], [official_wd(s, 0.05, 0.08, total) for s in range(total)], rtol=1e-6)


def _expected_decay(path):
    """The official no-decay rule spelled out for our names: decayed are exactly the weight matrices."""
    decayed = ('class_emb/embedding', 'word_embed/kernel', 'attn/mat_qkv/kernel', 'attn/proj/kernel',
               'ffn/fc1/kernel', 'ffn/fc2/kernel', 'ada_lin/kernel', 'shared_ada_lin/kernel', 'head/kernel')
    return any(path == d or path.endswith('/' + d) for d in decayed)


@pytest.mark.parametrize('shared_aln', [False, True])
def test_decay_mask_is_the_official_groups(shared_aln):
    from var_jax import api
    _, var = api.build_models(train_worker.VAE, dict(train_worker.VAR, shared_aln=shared_aln))
    params = jax.eval_shape(var.init, jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 20, 8)))['params']
    mask = {'/'.join(k): v for k, v in traverse_util.flatten_dict(optim.decay_mask(params)).items()}
    names = set(mask)
    # The blocks' params are stacked (a leading depth axis): their biases are 2-D and still not decayed.
    must_have = ['pos_start', 'pos_1LC', 'lvl_embed/embedding', 'blocks/attn/q_bias', 'blocks/attn/v_bias',
                 'blocks/attn/scale_mul', 'blocks/ffn/fc2/bias', 'word_embed/bias', 'head/bias',
                 'head_nm/ada_lin/kernel', 'head_nm/ada_lin/bias', 'class_emb/embedding']
    must_have += (['blocks/ada_gss', 'shared_ada_lin/kernel', 'shared_ada_lin/bias'] if shared_aln
                  else ['blocks/ada_lin/kernel', 'blocks/ada_lin/bias'])
    assert set(must_have) <= names
    wrong = {n: mask[n] for n in names if mask[n] != _expected_decay(n)}
    assert not wrong, f'decay mask differs from the official groups: {wrong}'


def test_adamw_weight_decay_is_decoupled_and_masked():
    """Zero gradient: decayed params shrink by exactly lr * wd (p <- p - lr wd p), others stay."""
    cfg = _optim(tblr=0.1, warmup_steps=0, wd=0.05, wd_end=0.05)
    tx = optim.make_optimizer(cfg, 10, 256)  # lr at step 0 = 0.1
    params = {'blocks_0': {'ffn': {'fc1': {'kernel': jnp.full((3, 4), 2.0), 'bias': jnp.full((4,), 2.0)}}},
              'pos_1LC': jnp.full((5, 4), 2.0)}
    step = jax.jit(lambda p: optax.apply_updates(p, tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]))
    new = jax.device_get(step(params))
    np.testing.assert_allclose(new['blocks_0']['ffn']['fc1']['kernel'], 2.0 * (1 - 0.1 * 0.05), rtol=1e-6)
    np.testing.assert_array_equal(new['blocks_0']['ffn']['fc1']['bias'], 2.0)
    np.testing.assert_array_equal(new['pos_1LC'], 2.0)


def test_gradient_clipping_at_global_norm():
    """clip=2: a gradient of global norm 20 reaches AdamW scaled to norm 2 (the first Adam update is
    scale-free, so look at the first moment, which holds (1 - b1) * the clipped gradient)."""
    cfg = _optim(tblr=0.1, warmup_steps=0, wd=0.0, wd_end=0.0, clip=2.0)
    tx = optim.make_optimizer(cfg, 10, 256)
    params = {'w': jnp.zeros((2, 2))}
    g = {'w': jnp.full((2, 2), 10.0)}  # global norm 20
    _, state = jax.jit(tx.update)(g, tx.init(params), params)
    (adam,) = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'mu')) if hasattr(s, 'mu')]
    np.testing.assert_allclose(adam.mu['w'], (1 - 0.9) * 1.0, rtol=1e-6)  # clipped gradient: 1.0 per element


def test_progressive_training_uses_the_lin_pg_schedule(monkeypatch, tmp_path):
    config = small_config(str(tmp_path / 'data'), **{'transformer.pg': 0.5, 'transformer.total_steps': 40,
                                                      'transformer.optim.warmup_steps': 4})
    captured = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        captured.append(real(*args, **kwargs))
        raise Stop

    real = optim.make_optimizer
    monkeypatch.setattr(optim, 'make_optimizer', spy)
    with pytest.raises(Stop):
        transformer.train(config, str(tmp_path), 10, vae_params={})
    got = _hyperparams_per_step(captured[0], 40)[:, 0]
    peak = config.transformer.optim.tblr * config.transformer.batch_size / 256
    want = [official_lr(s, peak, 4, 40, 0.005, config.transformer.optim.wpe, sche='lin0.5') for s in range(40)]
    np.testing.assert_allclose(got, want, rtol=2e-6)


# =============================================================================================
# 3. Progressive training weights
# =============================================================================================
def official_progressive_weights(patch_nums, total, warmup, pg, pg0, pgwp):
    """(total, L) loss weights of the official trainer, simulated step by step (train.py's prog_si and
    trainer.py's VARTrainer.train_step state: prog_it, last_prog_si, first_prog), truncation = weight 0."""
    K = len(patch_nums)
    ends = np.cumsum([p * p for p in patch_nums])
    L = int(ends[-1])
    last, first, prog_it, out = -1, True, 0, []
    for it in range(total):
        if not pg:
            si = -1
        elif it <= warmup:
            si = pg0
        elif it >= total * pg:
            si = K - 1
        else:
            progress = min(max((it - warmup) / (total * pg - warmup), 0), 1)
            si = pg0 + round(progress * (K - 1 - pg0))
        if last != si:
            if last != -1:
                first = False
            last, prog_it = si, 0
        prog_it += 1
        wp = 1 if first else max(min(prog_it / pgwp, 1), 0.01)
        if si == K - 1:
            si = -1
        w = np.full(L, 1 / L)
        if si >= 0:
            bg, ed = (ends[si - 1] if si else 0), ends[si]
            w[ed:] = 0
            w[bg:ed] *= min(max(wp, 0), 1)
        out.append((si, w))
    return out


PROG_CASES = [((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 200, 20, 0.6, 4, 7),
              ((1, 2, 4, 8), 60, 0, 0.8, 1, 3),
              ((1, 2, 4, 8), 50, 5, 0.5, 0, 1)]


def test_progressive_weights_off():
    for pns in [(1, 2, 4, 8), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]:
        L = sum(p * p for p in pns)
        for step in (0, 7, 999):
            w = transformer.progressive_token_weights(pns, step, 1000, 10, pg=0.0, pg0=4, pgwp_steps=5)
            np.testing.assert_array_equal(w, np.full(L, 1 / L, np.float32))
            assert w.dtype == np.float32


@pytest.mark.parametrize('case', PROG_CASES)
def test_progressive_weights_match_official_before_the_last_stage(case):
    pns, total, warmup, pg, pg0, pgwp = case
    ref = official_progressive_weights(pns, total, warmup, pg, pg0, pgwp)
    stages, ramped = set(), 0
    for step, (si, want) in enumerate(ref):
        if si < 0:
            continue
        stages.add(si)
        ramped += bool(0 < want[want > 0].min() < want.max())
        got = transformer.progressive_token_weights(pns, step, total, warmup, pg=pg, pg0=pg0, pgwp_steps=pgwp)
        end = int(np.cumsum([p * p for p in pns])[si])  # the sequence is truncated at the stage's last scale
        assert got.shape == (end,) and not want[end:].any(), (step, si, got.shape)
        np.testing.assert_allclose(got, want[:end], rtol=1e-6, atol=0, err_msg=f'step {step}, stage {si}')
    assert len(stages) >= 2  # the cases cross stage boundaries ...
    assert (ramped > 0) == (pgwp > 1)  # ... and ramp the newest scale when pgwp > 1


@pytest.mark.parametrize('case', [c for c in PROG_CASES if c[-1] > 1])
def test_progressive_weights_match_official_in_the_last_stage(case):
    pns, total, warmup, pg, pg0, pgwp = case
    for step, (si, want) in enumerate(official_progressive_weights(pns, total, warmup, pg, pg0, pgwp)):
        if si < 0:
            got = transformer.progressive_token_weights(pns, step, total, warmup, pg=pg, pg0=pg0, pgwp_steps=pgwp)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=f'step {step}')


def test_pgwp_defaults_to_the_official_ep_over_300():
    """Official: pgwp = ep/300 epochs when not given, i.e. total_steps / 300 steps."""
    from configs.common import base_config
    cfg = base_config().transformer
    assert cfg.pgwp_steps == 0
    cfg.total_steps = 3000
    assert transformer.pgwp_steps(cfg) == 10
    cfg.pgwp_steps = 7
    assert transformer.pgwp_steps(cfg) == 7


# =============================================================================================
# 6. Non-finite handling in fit (the step-level checks run in the sharded worker, see below)
# =============================================================================================
def test_fit_raises_nonfinite_error_naming_last_good_checkpoint(tmp_path):
    """A NaN at step 3 (0-based 2) is caught at the next log/save boundary (4), before saving it."""
    from var_jax import sharding
    from var_jax.checkpoint import Checkpointer
    from configs.common import base_config
    config = base_config()
    config.update(dict(seed=0, keep_checkpoints=3, save_every=2, log_every=2, sample_every=1000))
    config.data.update(dict(data_dir=str(tmp_path / 'data'), image_size=8, synthetic_train_size=16,
                            synthetic_test_size=4))
    tx = optax.sgd(0.1)
    state = loop.new_state({'w': jnp.ones((2, 2))}, tx, 0)
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    shardings = sharding.param_sharding(mesh, state)

    def step_fn(state, batch):
        def loss_fn(p):
            scale = jnp.where(state['step'] == 2, jnp.nan, jnp.mean(batch['image']) ** 2 + 1)
            return jnp.sum(p['w'] ** 2) * scale
        loss, grads = jax.value_and_grad(loss_fn)(state['params'])
        return loop.apply_update(state, grads, tx, loss, optax.tree.norm(grads)), dict(loss=loss)

    with pytest.raises(loop.NonFiniteError) as e:
        loop.fit('toy', str(tmp_path), config, state=state, state_shardings=shardings, mesh=mesh,
                  step_fn=step_fn, step_args=(), total_steps=8, batch_size=4)
    stage_dir = str(tmp_path / 'toy')
    assert 'step 2' in str(e.value) and stage_dir in str(e.value), str(e.value)
    with Checkpointer(stage_dir) as ckpt:
        assert ckpt.all_steps() == [2]  # step 4's state (flag raised) was not saved


# =============================================================================================
# 7. Bad input
# =============================================================================================
def test_unknown_stage_is_rejected(tmp_path):
    config = small_config(str(tmp_path / 'data'), stages='tokenizer,transformr')
    with pytest.raises(ValueError, match='transformr'):
        trainers.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_image_size_must_match_the_tokenizer(tmp_path):
    config = small_config(str(tmp_path / 'data'), **{'data.image_size': 16})
    with pytest.raises(ValueError, match='image_size=8'):
        trainers.run(config, str(tmp_path))


def test_transformer_stage_without_tokenizer(tmp_path):
    config = small_config(str(tmp_path / 'data'), stages='transformer')
    with pytest.raises(FileNotFoundError) as e:
        trainers.run(config, str(tmp_path / 'work'))
    assert os.path.join(str(tmp_path / 'work'), 'tokenizer', 'export') in str(e.value)


@pytest.mark.parametrize('stages', ['tokenizer,transformer', 'transformer'])
def test_init_from_missing_directory(tmp_path, stages):
    missing = str(tmp_path / 'no_such_checkpoint')
    config = small_config(str(tmp_path / 'data'), stages=stages, init_from=missing)
    with pytest.raises(FileNotFoundError, match='no_such_checkpoint'):
        trainers.run(config, str(tmp_path / 'work'))


def test_incompatible_checkpoint_raises_config_mismatch(finished_run):
    """Run A's workdir holds transformer checkpoints of var.depth=2: resuming it with var.depth=1 must
    be refused with the differing field named, before anything is written. (The transformer stage:
    its model init compiles faster in this process than the tokenizer's; both stages share fit.)"""
    from var_jax.checkpoint import ConfigMismatchError
    workdir, data_dir = finished_run
    stage = os.path.join(workdir, 'transformer')
    listing = lambda: sorted(os.listdir(os.path.join(stage, 'checkpoints')))
    before = open(os.path.join(stage, 'config.json'), 'rb').read(), listing()
    config = small_config(data_dir, stages='transformer', **{'var.depth': 1})
    with pytest.raises(ConfigMismatchError) as e:
        trainers.run(config, workdir)
    msg = str(e.value)
    assert 'var.depth' in msg and 'checkpoint=2' in msg and 'now=1' in msg, msg
    assert 'stages' not in msg and 'var.embed_dim' not in msg, msg  # only what differs and matters
    assert (open(os.path.join(stage, 'config.json'), 'rb').read(), listing()) == before


def test_other_stage_settings_do_not_block_resume(finished_run):
    """The tokenizer's checkpoints ignore the transformer's settings: retuning the transformer in a
    workdir with a finished tokenizer finds the tokenizer done (nothing retrained, nothing written)
    instead of refusing; a tokenizer setting is still checked."""
    from var_jax.checkpoint import ConfigMismatchError
    workdir, data_dir = finished_run
    ckpts = os.path.join(workdir, 'tokenizer', 'checkpoints')
    listing = lambda: {d: os.path.getmtime(os.path.join(ckpts, d)) for d in os.listdir(ckpts)}
    before = listing()
    config = small_config(data_dir, stages='tokenizer', **{'transformer.optim.tblr': 0.123, 'var.depth': 1})
    trainers.run(config, workdir)
    assert listing() == before
    with pytest.raises(ConfigMismatchError, match='tokenizer.l1'):
        trainers.run(small_config(data_dir, stages='tokenizer', **{'tokenizer.l1': 0.5}), workdir)


@pytest.mark.slow
def test_ctrl_c_while_a_checkpoint_is_written_exits_cleanly(tmp_path, background, finished_run):
    """Ctrl-C during an asynchronous save: one message, exit code 130, no traceback; what is on disk restores.
    (The tokenizer stage of run A's config, in a workdir of its own: it loads run A's executables and data.)"""
    from var_jax.checkpoint import Checkpointer
    work = str(tmp_path / 'work')
    flags = main_flags(work, finished_run[1], stages='tokenizer')
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'train_worker.py'), 'main_interrupted',
                           'tokenizer', '8'] + flags, cwd=REPO, env=_env(background.cache_dir),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 130, out[-3000:]
    assert 'interrupted:' in proc.stderr and 'run the same command again to resume' in proc.stderr, out[-3000:]
    assert 'Traceback' not in out, out[-3000:]
    with Checkpointer(os.path.join(work, 'tokenizer')) as ckpt:  # also discards an unfinished save
        steps = ckpt.all_steps()
    assert steps and steps[0] == 4 and steps[-1] <= 8, steps  # step 8's save was in flight
    state = _restore_raw(os.path.join(work, 'tokenizer', 'checkpoints', str(steps[-1]), 'state'))
    assert int(state['step']) == steps[-1]


# =============================================================================================
# 4. Sharded step equivalence (and 6. the non-finite guard of the step), one 4-device subprocess
# =============================================================================================
def test_sharded_steps_equal_single_device(sharded):
    res, _ = sharded
    assert res['n_devices'] == 4
    meshes = res['meshes']
    assert {k: v['mesh_shape'] for k, v in meshes.items()} == {
        '1dev': {'data': 1, 'fsdp': 1}, 'dp4': {'data': 4, 'fsdp': 1},
        'fsdp2': {'data': 2, 'fsdp': 2}, 'fsdp4': {'data': 1, 'fsdp': 4}}
    # FSDP really split the params (and their Adam moments): the blocks' stacked mat_qkv (2, 64, 192) along
    # its 192 columns.
    assert meshes['fsdp2']['qkv_spec'] == meshes['fsdp4']['qkv_spec'] == "(None, None, 'fsdp')"
    assert meshes['fsdp2']['qkv_shard_shape'] == [2, 64, 96] and meshes['fsdp4']['qkv_shard_shape'] == [2, 64, 48]
    assert meshes['fsdp4']['n_split_leaves'] > meshes['fsdp4']['n_leaves'] // 2
    assert meshes['dp4']['n_split_leaves'] == 0
    ref = meshes['1dev']
    assert ref['params_moved'] > 1e-3  # the two steps did update the params
    for name, m in meshes.items():
        assert m['step'] == train_worker.NUM_STEPS and not m['nonfinite'] and m['rng_equal']
        for i, (got, want) in enumerate(zip(m['metrics'], ref['metrics'])):
            for k in want:  # loss, grad_norm, per-scale losses and accuracies, lr
                np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=f'{name} step {i} {k}')
        assert m['max_param_diff'] <= 1e-5, (name, m['worst_param'], m['max_param_diff'])
        assert m['max_opt_diff'] <= 1e-5, name


def test_fsdp4_checkpoint_restores_on_one_device(sharded):
    from var_jax import api, sharding
    from var_jax.checkpoint import Checkpointer
    _, out = sharded
    vqvae, var = api.build_models(train_worker.VAE, train_worker.VAR)
    tx = optim.make_optimizer(ml_collections.ConfigDict(train_worker.OPTIM), train_worker.TOTAL_STEPS,
                              train_worker.BATCH)
    L = sum(p * p for p in var.patch_nums)
    abstract = jax.eval_shape(lambda: loop.new_state(
        var.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - 1, var.cvae)))['params'],
        tx, train_worker.SEED))
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    target = sharding.with_shardings(abstract, sharding.param_sharding(mesh, abstract))
    with Checkpointer(os.path.join(out, 'ckpt')) as ckpt:
        assert ckpt.all_steps() == [train_worker.NUM_STEPS]
        restored = ckpt.restore(target)
    want = dict(np.load(os.path.join(out, 'arrays.npz')))
    got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(restored)}
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert len(v.sharding.device_set) == 1, k
        np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)
    assert int(restored['step']) == train_worker.NUM_STEPS


def test_step_skips_nonfinite_updates(sharded):
    g = sharded[0]['guard']
    assert not g['finite']['nonfinite'] and not g['finite']['params_unchanged']
    for case in ('nan_param', 'huge_param'):  # NaN loss; finite loss with an Inf gradient
        r = g[case]
        assert r['nonfinite'] and r['params_unchanged'] and r['opt_state_unchanged'], (case, r)
        assert r['step'] == 1, (case, r)  # the batch is consumed
    assert math.isinf(g['huge_param']['grad_norm']) and math.isfinite(g['huge_param']['loss'])
    r = g['finite_after_nan']  # the flag stays raised until fit looks at it
    assert r['nonfinite'] and not r['params_unchanged'] and r['step'] == 2


def test_step_flags_nan_images(sharded):
    r = sharded[0]['guard']['nan_images']
    assert r['nonfinite'] and r['params_unchanged'], r


def test_logged_lr_is_the_lr_of_the_step(sharded):
    """The lr a step logs is the official lr of that step (step 0: warm-up start), written out independently."""
    o = train_worker.OPTIM
    peak = o['tblr'] * train_worker.BATCH / 256
    logged = [m['lr'] for m in sharded[0]['meshes']['1dev']['metrics']]
    want = [official_lr(s, peak, o['warmup_steps'], train_worker.TOTAL_STEPS, o['wp0'], o['wpe'])
            for s in range(len(logged))]
    assert len(logged) == train_worker.NUM_STEPS and want[0] != want[1]
    np.testing.assert_allclose(logged, want, rtol=1e-6)


def test_truncated_progressive_step_equals_the_masked_full_step(sharded):
    """A progressive stage runs on the sequence cut at its last scale (the compute saving); its loss and
    update equal the full-length step with the later tokens weighted 0 (block-causal attention).
    (Run in the sharded worker: the full-length step is its 1-device executable.)"""
    res, out = sharded
    assert list(res['truncated']) == ['5']  # patch_nums (1, 2, 4): the stage of scales 1 and 2
    for end, m in res['truncated'].items():
        cut, full = m['cut'], m['full']
        np.testing.assert_allclose(cut['loss'], full['loss'], rtol=1e-5)
        np.testing.assert_allclose(cut['grad_norm'], full['grad_norm'], rtol=1e-4)
        with np.load(os.path.join(out, f'truncated_{end}.npz')) as f:
            params = {k: f[k] for k in f.files}
        keys = [k[len('cut'):] for k in params if k.startswith('cut')]
        assert len(keys) > 20 and sorted(f'full{k}' for k in keys) == sorted(k for k in params if k.startswith('full'))
        for k in keys:
            np.testing.assert_allclose(params['cut' + k], params['full' + k], rtol=1e-4, atol=1e-6, err_msg=k)
        assert math.isnan(cut['Lt']) and math.isfinite(full['Lt'])  # the finest scale is not trained yet


# =============================================================================================
# 5. Kill and resume: main.py end to end
# =============================================================================================
def _restore_raw(path):
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        return jax.device_get(ckptr.restore(path))


def _compare_bitwise(a, b, what):
    fa = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(a)}
    fb = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(b)}
    assert fa.keys() == fb.keys(), what
    diffs = {k: float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) for k in fa
             if not np.array_equal(fa[k], fb[k])}
    assert not diffs, f'{what}: not bitwise equal, max |diff| per leaf: {diffs}'


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(resumed_runs):
    from var_jax import checkpoint
    runs, stage = resumed_runs, resumed_runs.stage
    a, b = runs.workdirs['A'], runs.workdirs['B']
    b1_log, b2_log = (_tail(os.path.join(runs.base, runs.log(r)), 10 ** 7) for r in ('B1', 'B2'))
    assert f'[{stage}] step 4/12' in b1_log and f'[{stage}] step 8/12' not in b1_log
    if runs.signal == signal.SIGKILL:
        assert runs.b1_returncode == -signal.SIGKILL
        resumed_at = 4  # steps 5.. are redone from checkpoint 4
    else:  # SIGTERM during step PAUSE_AT's save: the run finishes the next step, saves it and exits cleanly
        resumed_at = PAUSE_AT + 1
        assert runs.b1_returncode == EXIT_PREEMPTED, b1_log[-3000:]
        assert f'preempted: saved step {resumed_at}' in b1_log and 'Traceback' not in b1_log, b1_log[-3000:]
    assert f'[{stage}] step 12/12' in b2_log and f'resumed from step {resumed_at} of' in b2_log
    if stage == 'transformer':
        assert 'resumed from step 12 of' in b2_log  # the finished tokenizer stage is not retrained
    for w in (a, b):
        for st in runs.stages:
            steps = sorted(int(s) for s in os.listdir(os.path.join(w, st, 'checkpoints')) if s.isdigit())
            assert steps[-1] == 12, (w, st, steps)
            assert not [s for s in os.listdir(os.path.join(w, st, 'checkpoints')) if 'tmp' in s]
    # Whole train states (params, AdamW moments, step, rng, data position; with the discriminator on,
    # its params and Adam state) and the exported models.
    for st in runs.stages:
        state_a = _restore_raw(os.path.join(a, st, 'checkpoints', '12', 'state'))
        _compare_bitwise(state_a, _restore_raw(os.path.join(b, st, 'checkpoints', '12', 'state')), f'{st} state')
    if 'tokenizer.disc_weight' in runs.overrides:
        adam_count = jax.tree.leaves(state_a['disc_opt_state'])[0]  # steps the discriminator trained
        assert int(adam_count) == 12 - runs.overrides['tokenizer.disc_start'], state_a['disc_opt_state']
    exports = ['tokenizer/export'] + (['export'] if 'transformer' in runs.stages else [])
    for export in exports:
        cfg_a, params_a = checkpoint.load_pretrained(os.path.join(a, export))
        cfg_b, params_b = checkpoint.load_pretrained(os.path.join(b, export))
        assert cfg_a == cfg_b and set(params_a) == ({'vae', 'var'} if export == 'export' else {'vae'})
        _compare_bitwise(params_a, params_b, export)
    # The end of the run (final sample grid of its last stage) was reached in both.
    grid = {'tokenizer': 'recon', 'transformer': 'samples'}[runs.stages[-1]]
    for w in (a, b):
        assert os.path.exists(os.path.join(w, runs.stages[-1], 'samples', f'{grid}_0000012.png'))
