"""Training across processes (jax.distributed, as on several hosts) equals training on one.

Two CPU processes of one device each, joined through ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (gloo collectives), train the tiny network in one
shared workdir, stop after one epoch and resume for the second; this process trains the same
network for two epochs on its 2 fake devices. Same global batches, same sharding: the test
predictions must agree, and the shared workdir must hold one clean copy of every file (one
metrics line per epoch, not one per process). The second process reaches Orbax's barriers late,
so the checkpoint managers' barriers overlap on every save, as they do by chance on a busy machine.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from _fake_cache import FakeCache
from _multiprocess_worker import tiny_fit_config
from conftest import REPO_ROOT

from sapsam_jax.train._loop import fit

TESTS = REPO_ROOT / "tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, epochs: int, n_processes: int = 2):
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(n_processes):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES=str(n_processes),
            JAX_PROCESS_ID=str(pid),
            # The last process reaches the checkpoint barriers late, as on a loaded machine.
            LAG_CHECKPOINT_COMMITS_S="2" if pid == n_processes - 1 else "0",
            PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        )
        cmd = [sys.executable, str(TESTS / "_multiprocess_worker.py"), str(workdir), str(epochs)]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(subprocess.Popen(cmd, env=env, **pipes))
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:  # a hung process (its peer died at a barrier) must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [pid for pid, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(
        f"process {pid} exited with {procs[pid].returncode}:\n{_first_errors(outputs[pid][1])}"
        for pid in failed
    )
    return [out for out, _ in outputs]


def _first_errors(stderr: str, n_lines: int = 40) -> str:
    """The lines naming errors (the cause comes first; a distributed abort only ends the log)."""
    lines = [line for line in stderr.splitlines() if "Error" in line or "error" in line]
    return "\n".join(lines[:n_lines]) or stderr[-3000:]


def test_two_processes_train_and_resume_like_one_process_with_two_devices(tmp_path):
    _launch(tmp_path / "multi", epochs=1)
    outputs = _launch(tmp_path / "multi", epochs=2)  # resumes from the 2-process checkpoint
    assert "resuming after epoch 1" in outputs[0]
    fit(tiny_fit_config(tmp_path / "single"), FakeCache(n_patients=10), log=lambda *_: None)

    multi = np.load(tmp_path / "multi" / "predictions_test.npz")
    single = np.load(tmp_path / "single" / "predictions_test.npz")
    np.testing.assert_array_equal(multi["labels"], single["labels"])
    assert np.ptp(single["probs"]) > 1e-3, "the toy run should give different outputs"
    np.testing.assert_allclose(multi["probs"], single["probs"], atol=2e-5)

    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    # Only the first process reports; the other trains silently.
    assert "epoch 2" in outputs[0] and "epoch 2" not in outputs[1]


# What scripts/train.py does first: parse the flags (``--preset auto`` asks JAX for its
# backend), then train() joins the job. Joining after the backend has started is refused.
_JOIN_LIKE_THE_CLI = """
import jax
from sapsam_jax.train._cli import parse_config
from sapsam_jax.train._distributed import maybe_initialize_distributed
cfg, reason = parse_config(["--task", "disease"])
maybe_initialize_distributed()  # the first line of train()
print("processes", jax.process_count(), "preset", cfg.preset)
"""


def test_the_train_command_with_the_auto_preset_joins_a_multi_process_job():
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _JOIN_LIKE_THE_CLI],
            env=dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(pid),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, _first_errors(err)
        assert "processes 2 preset quick" in out  # two processes launched, no accelerator
