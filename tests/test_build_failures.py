"""A distributed cache build fails on every process together: 2 real processes (gloo on the CPU), one of them failing.

Without that, a process that raises between two collectives leaves the other waiting in the next one until the
launcher's timeout (30 minutes by default); here both must stop within seconds with the same message.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

WORKER = ROOT / "tests" / "build_failure_worker.py"
# Well above what the worker needs on 2 busy cores (about 20 s), well below a hang.
TIMEOUT = 90


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The worker's caches, per-process results and logs, after both processes ended."""
    folder, logs = tmp_path_factory.mktemp("caches"), tmp_path_factory.mktemp("logs")
    group = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    workers = []
    for rank in range(2):
        env = {**os.environ, **group, "RANK": str(rank)}
        with open(logs / f"{rank}.log", "w") as log:
            command = [sys.executable, str(WORKER), str(folder)]
            workers.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    start = time.monotonic()
    try:
        for worker in workers:
            worker.wait(timeout=max(1.0, TIMEOUT - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
            worker.wait()
        tails = "\n".join((logs / f"{rank}.log").read_text()[-2000:] for rank in range(2))
        pytest.fail(f"the processes did not stop within {TIMEOUT} s:\n{tails}")
    outputs = [(logs / f"{rank}.log").read_text() for rank in range(2)]
    results = [json.loads((folder / f"results-{rank}.json").read_text()) for rank in range(2)]
    return folder, [worker.returncode for worker in workers], outputs, results


def test_an_error_in_one_process_s_share_ends_both_with_its_message(run):
    _, returncodes, outputs, _ = run
    assert returncodes[0] != 0 and returncodes[1] != 0, outputs
    # Process 1 raises its own error; process 0 says which process failed, in which stage, and with what.
    error = "OSError: image 40 is unreadable"
    assert outputs[1].rstrip().endswith(error), outputs[1][-3000:]
    failure = f"ProcessFailure: building the activation cache at block 3 failed on process 1 of 2: {error}"
    assert outputs[0].rstrip().endswith(failure), outputs[0][-3000:]


def test_an_error_while_preparing_reaches_the_main_process(run):
    _, _, _, results = run
    assert results[1]["prepare"] == "OSError: image 5 is unreadable"
    assert results[0]["prepare"] == (
        "ProcessFailure: building the activation cache at block 3 failed on process 1 of 2: OSError: image 5 is "
        "unreadable"
    )


def test_an_error_of_the_main_process_while_publishing_reaches_the_others(run):
    _, _, _, results = run
    assert results[0]["publish"].startswith("NotADirectoryError: ")
    assert results[1]["publish"] == (
        f"ProcessFailure: building the activation cache at block 3 failed on process 0 of 2: {results[0]['publish']}"
    )


def test_failed_builds_leave_no_cache_and_no_staging_folder(run):
    folder, _, _, _ = run
    # "blocked" is the file the publishing failure could not replace; "cache" and "single" are the good builds.
    assert sorted(os.listdir(folder)) == ["blocked", "cache", "results-0.json", "results-1.json", "single"]
    assert (folder / "blocked").read_text() == "a file where the cache should go"


def test_processes_still_build_together_after_failures(run):
    _, _, _, results = run
    # Every process left each failed build at the same collective: the next build runs, and gives the rows of a
    # single-process build.
    assert results[0]["same_rows"] is True
