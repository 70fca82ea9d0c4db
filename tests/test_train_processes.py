"""Training cases that need their own processes: 8 fake devices, SIGKILL + resume, two hosts.

Every case runs `python train.py` (or a short script) with sys.executable and
the tiny config; the subprocesses share a persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
COMMON = ["train.log_every=1", "train.eval_every=0", "train.progress_bar=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    # Compile-bound tiny runs: the suite's compile flags (tests/conftest.py).
    e.update(XLA_FLAGS=os.environ["XLA_FLAGS"], JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return e


def run_train(run_dir, *overrides, env, extra_args=(), check=True, **kw):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, f"run_dir={run_dir}", *COMMON,
           *overrides, *extra_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_losses(run_dir) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_eight_devices_with_data_fsdp_tensor_match_one_device(tmp_path, env):
    script = textwrap.dedent(f"""
        import json, sys
        import jax, numpy as np
        from jaxar.train.config import load_run_config
        from jaxar.train.trainer import train
        assert jax.device_count() == 8, jax.devices()
        common = {COMMON!r} + ["train.steps=10", "train.checkpoint_every=0", "train.eval_batches=0"]
        one = train(load_run_config({TINY!r}, ["run_dir={tmp_path}/one", "mesh.data=1", *common]),
                    devices=jax.devices()[:1])
        many = train(load_run_config({TINY!r}, ["run_dir={tmp_path}/many", "mesh.data=2", "mesh.fsdp=2",
                                                "mesh.tensor=2", *common]))
        specs = {{str(x.sharding.spec) for x in jax.tree_util.tree_leaves(many.state.params)}}
        diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(a))) + 1e-12))
                 for a, b in zip(jax.tree_util.tree_leaves(one.state.params),
                                 jax.tree_util.tree_leaves(many.state.params))]
        print("RESULT " + json.dumps({{"one": one.losses, "many": many.losses, "param_rel_diff": max(diffs),
                                       "specs": sorted(specs)}}))
    """)
    e = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    one = np.array([result["one"][str(s)] for s in range(1, 11)])
    many = np.array([result["many"][str(s)] for s in range(1, 11)])
    np.testing.assert_allclose(many, one, rtol=2e-3)
    assert result["param_rel_diff"] < 2e-3
    # The params really were split over all three mesh axes.
    assert any("fsdp" in s for s in result["specs"]) and any("tensor" in s for s in result["specs"])


def start_and_signal(run_dir, steps, env, sig, ready):
    """Start train.py slowed down, send `sig` once ready() says so; returns (returncode, stderr)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, f"run_dir={run_dir}", *COMMON, *steps]
    proc = subprocess.Popen(cmd, env=dict(env, JAXAR_DEBUG_STEP_SLEEP="0.25"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the signal:\n{proc.stderr.read()[-3000:]}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def complete_checkpoints(run_dir) -> list[int]:
    d = run_dir / "checkpoints"
    names = os.listdir(d) if d.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit() and (d / n / "_CHECKPOINT_METADATA").exists())


def test_killed_then_preempted_run_resumes_to_the_uninterrupted_loss(tmp_path, env):
    steps = ["train.steps=24", "train.checkpoint_every=4"]
    reference = tmp_path / "reference"
    run_train(reference, *steps, env=env)
    expected = train_losses(reference)

    run_dir = tmp_path / "run"
    # SIGKILL as soon as a checkpoint is complete: nothing gets to clean up.
    rc, _ = start_and_signal(run_dir, steps, env, signal.SIGKILL, lambda: complete_checkpoints(run_dir))
    assert rc == -signal.SIGKILL
    assert max(train_losses(run_dir)) < 24

    # Resume, then SIGTERM (preemption): the run saves where it is and exits cleanly.
    before = complete_checkpoints(run_dir)[-1]
    rc, err = start_and_signal(run_dir, steps, env, signal.SIGTERM,
                               lambda: max(train_losses(run_dir), default=0) >= before + 6)
    assert rc == 0, err[-3000:]
    assert f"resuming {run_dir} from step {before}" in err and "SIGTERM" in err
    stopped_at = max(train_losses(run_dir))
    assert stopped_at < 24 and complete_checkpoints(run_dir)[-1] == stopped_at

    resumed = run_train(run_dir, *steps, env=env)
    assert f"from step {stopped_at}" in resumed.stderr
    got = train_losses(run_dir)
    assert sorted(got) == list(range(1, 25))
    assert abs(got[24] - expected[24]) <= 1e-4 * abs(expected[24])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_together(tmp_path, env):
    run_dir = tmp_path / "run"
    port = _free_port()
    args = ["train.steps=8", "train.checkpoint_every=4", "train.eval_batches=0"]
    procs = []
    for pid in range(2):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, f"run_dir={run_dir}", *COMMON,
               *args, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            outs.append(err)
            assert p.returncode == 0, err[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    summaries = [re.search(r"\[jaxar\] step 8, loss (\S+)", err) for err in outs]
    assert all(summaries), outs
    assert summaries[0].groups() == summaries[1].groups()  # one model, trained together
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9)) and all(np.isfinite(list(losses.values())))
    assert losses[8] < losses[1]
    for step in (4, 8):  # each process saved its own data-iterator state
        names = os.listdir(run_dir / "checkpoints" / str(step) / "data")
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(names)
