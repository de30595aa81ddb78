"""N JAX processes of main.py on this machine, as one multi-host run (for trying the multi-host path without a pod).

    python -m var_jax.launch --num_processes 2 -- main.py --config=configs/var_small.py --workdir=workdirs/mh

Each process gets --config.distributed=True and --config.cluster.* (a free local port for the coordinator, the
process count, its id); on CPU each also gets --devices_per_process simulated devices (XLA's host platform device
count). Only process 0's output shows in full (main.py silences the progress lines of the others); every other
process's stderr (warnings, errors) shows prefixed with its id. The launcher exits with the first non-zero exit
code; the processes that are left get `--grace_s` to notice the lost one (JAX's heartbeat, cluster.heartbeat_timeout_s)
before they are killed. SIGTERM / Ctrl-C to the launcher reach every process.

On a real cluster start main.py once per host instead (docs/training.md#multiple-hosts).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def process_args(command, i: int, n: int, port: int) -> list:
    return [
        sys.executable,
        *command,
        '--config.distributed=True',
        f'--config.cluster.coordinator_address=127.0.0.1:{port}',
        f'--config.cluster.num_processes={n}',
        f'--config.cluster.process_id={i}',
    ]


def _relay(stream, prefix: str):
    for line in iter(stream.readline, ''):
        sys.stderr.write(prefix + line)
        sys.stderr.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--num_processes', type=int, default=2)
    p.add_argument(
        '--devices_per_process',
        type=int,
        default=2,
        help='simulated CPU devices per process (JAX_PLATFORMS=cpu); 0: leave XLA_FLAGS alone',
    )
    p.add_argument('--grace_s', type=float, default=120, help='after one process fails, how long the rest may take')
    p.add_argument('command', nargs=argparse.REMAINDER, help='-- main.py and its flags')
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command or args.num_processes < 1:
        p.error('give --num_processes N >= 1 and the command after --, e.g. -- main.py --config=configs/var_small.py')
    env = dict(os.environ)
    if args.devices_per_process:
        flag = f'--xla_force_host_platform_device_count={args.devices_per_process}'
        env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + flag).strip()
    port, n = free_port(), args.num_processes
    procs = []
    for i in range(n):
        procs.append(
            subprocess.Popen(
                process_args(command, i, n, port), env=env, text=True, stderr=None if i == 0 else subprocess.PIPE
            )
        )
        if i:
            threading.Thread(target=_relay, args=(procs[-1].stderr, f'[process {i}] '), daemon=True).start()

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed_at = None
    while any(proc.poll() is None for proc in procs):
        codes = [proc.poll() for proc in procs]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > args.grace_s:
            for proc in procs:
                if proc.poll() is None:
                    print(
                        f'var_jax.launch: process {procs.index(proc)} still runs {args.grace_s:.0f} s after another '
                        f'failed; killing it',
                        file=sys.stderr,
                        flush=True,
                    )
                    proc.kill()
        time.sleep(0.2)
    codes = [proc.wait() for proc in procs]
    code = next((c for c in codes if c != 0), 0)
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's 128 + its number


if __name__ == '__main__':
    sys.exit(main())
