"""run.workers: modules and local mode's experts trained side by side in worker processes give the bits one process
of the same threads per job gives, and unlearning verifies such a run."""

import json
import math
import os

import pytest
import torch

from fedfactory.config import ConfigError, load_config
from fedfactory.federation.runner import run
from fedfactory.federation.unlearning import unlearn
from fedfactory.workers import job_threads, run_jobs, torch_threads

CPU = torch.device("cpu")


def file_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_run_jobs_keeps_the_order_of_the_jobs_unless_asked_not_to():
    jobs = [4.0, 81.0, 9.0, 16.0]
    # The costliest job starts first, yet results come back in the jobs' order.
    assert list(run_jobs(math.sqrt, jobs, workers=2, device=CPU, cost=lambda x: x)) == [2.0, 9.0, 3.0, 4.0]
    assert list(run_jobs(math.sqrt, jobs, workers=1, device=CPU)) == [2.0, 9.0, 3.0, 4.0]
    # Or as they finish (modules are written at once, so a stopped run keeps every finished one).
    assert sorted(run_jobs(math.sqrt, jobs, workers=2, device=CPU, in_order=False)) == [2.0, 3.0, 4.0, 9.0]
    assert list(run_jobs(math.sqrt, [], workers=2, device=CPU)) == []
    # A job's own error reaches the caller as it is.
    with pytest.raises(ValueError, match="math domain error"):
        list(run_jobs(math.sqrt, [4.0, -1.0, 9.0], workers=2, device=CPU))
    # A worker that dies (killed, out of memory) is named, with what to do.
    with pytest.raises(RuntimeError, match="worker process died.*run.workers=1"):
        list(run_jobs(os._exit, [1, 1], workers=2, device=CPU))


def test_workers_split_the_threads_and_refuse_an_accelerator():
    with torch_threads(2):
        assert job_threads(1) == 2 and job_threads(2) == 1 and job_threads(3) == 1
    with pytest.raises(ConfigError, match="set run.workers=1"):
        list(run_jobs(math.sqrt, [1.0, 4.0], workers=2, device=torch.device("cuda")))
    with pytest.raises(ConfigError, match="run.workers"):
        load_config("tiny", ["run.workers=0"])


def test_a_local_run_on_two_workers_is_the_one_thread_run_bit_for_bit_and_unlearns_verifiably(tmp_path):
    one = load_config("tiny", [f"run.out={tmp_path / 'one'}", "run.threads=1", "classifier.mode=local"])
    two = load_config("tiny", [f"run.out={tmp_path / 'two'}", "run.threads=2", "run.workers=2",
                               "classifier.mode=local"])
    a, b = run(one), run(two)
    # Every module and every expert: two worker processes of one thread each train what one thread trains alone.
    assert file_bytes(tmp_path / "one" / "modules") == file_bytes(tmp_path / "two" / "modules")
    assert file_bytes(tmp_path / "one" / "experts") == file_bytes(tmp_path / "two" / "experts")
    assert a["accuracy"] == b["accuracy"] and a["expert_accuracy"] == b["expert_accuracy"]
    assert json.loads((tmp_path / "two" / "release.json").read_text()).keys() == set(b["modules"])
    # The verification retrains the remaining modules on the run's workers, and gets the same bits again.
    cert = unlearn(tmp_path / "two", clients=(4,), out=tmp_path / "u", verify=True)
    assert cert["verification"]["verified"], cert["verification"]["summary"]
