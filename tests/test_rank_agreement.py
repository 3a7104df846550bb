"""Every process takes the same freeze decisions, and a failure on one process stops all of them: two gloo processes
started directly (no launcher agent that would kill the others when one dies, as torchrun's does)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from hf_freezecache.models import load_cifar_resnet

WORKER = str(ROOT / "tests" / "rank_agreement_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*arguments: str, timeout: float) -> list[subprocess.CompletedProcess]:
    """Runs the worker as processes 0 and 1 of a 2-process group; returns both results (a process still running
    after `timeout` seconds is killed and reported with return code None)."""
    port = _free_port()
    processes = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        command = [sys.executable, WORKER, *arguments]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    deadline = time.monotonic() + timeout
    results = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(process.args, process.returncode, output))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            results.append(subprocess.CompletedProcess(process.args, None, output))
    return results


def test_every_policy_freezes_the_same_blocks_at_the_same_steps_on_every_process(tmp_path, resnet20_weights):
    reference = tmp_path / "reference.pt"
    torch.save(load_cifar_resnet(resnet20_weights, num_classes=10).state_dict(), reference)
    results = _launch("timelines", str(tmp_path), str(reference), timeout=540)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"process {rank}:\n{result.stdout[-6000:]}"
    timelines = [json.loads((tmp_path / f"timelines-{rank}.json").read_text()) for rank in (0, 1)]
    assert timelines[0] == timelines[1]
    # The test policy decides differently on each process: both applied process 0's decisions.
    assert timelines[0]["rank-dependent"] == [[0, 1], [1, 2]]
    assert timelines[0]["fixed"] == [[0, 2], [1, 2]]  # 64 samples / (2 x 8): 4 steps an epoch
    # Each policy froze something in these few steps, so the comparison above is not of empty timelines.
    assert all(timelines[0][policy] for policy in timelines[0]), timelines[0]


@pytest.fixture
def corrupt_cache(tmp_path) -> Path:
    """A run whose cache at block 3 exists, with one shard altered after it was built."""
    results = _launch("discard", str(tmp_path), timeout=300)
    assert all(r.returncode == 0 for r in results), "\n".join(r.stdout[-4000:] for r in results)
    shard = next((tmp_path / "activation_cache" / "position-03").glob("*.arrow"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def test_a_corrupt_cache_seen_by_process_0_stops_both_processes_with_its_message(tmp_path, corrupt_cache):
    start = time.monotonic()
    results = _launch("discard", str(tmp_path), timeout=240)
    elapsed = time.monotonic() - start
    assert None not in [r.returncode for r in results], (
        "a process was still waiting when the other had failed:\n" + "\n".join(r.stdout[-3000:] for r in results)
    )
    assert all(r.returncode != 0 for r in results)
    message = f"Cache shard {corrupt_cache} does not match its checksum"
    assert message in results[0].stdout
    assert "failed on process 0 of 2" in results[1].stdout and message in results[1].stdout
    assert elapsed < 200
