"""Slots: one GPU per run, or the CPU cores split; each slot's environment keeps its run to its share."""

import os
import subprocess
import sys

import pytest

from pneumo.sweeps.slots import GPU_DRIVER_PATHS, Slot, slots, visible_gpus


def test_slots_one_gpu_each_or_cores_split():
    gpu = slots(["0", "1", "3"], cores=16)
    assert [s.gpu for s in gpu] == ["0", "1", "3"] and all(s.threads == 5 for s in gpu)
    assert len(slots(["0", "1"], max_parallel=1, cores=8)) == 1
    cpu = slots([], cores=8, max_parallel=4)
    assert cpu == [Slot(None, 2)] * 4
    assert len(slots([], cores=2)) == 2
    assert slots([], cores=2, max_parallel=8) == [Slot(None, 1)] * 2  # never more slots than cores


def test_a_slot_caps_every_thread_pool_of_its_run():
    assert Slot("1", 4).environment() == {"CUDA_VISIBLE_DEVICES": "1", "PNEUMO_THREADS": "4",
                                          "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    cpu = Slot(None, 2).environment()
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["MKL_NUM_THREADS"] == cpu["OMP_NUM_THREADS"] == "2"


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


@pytest.mark.skipif(not sys.platform.startswith("linux") or any(os.path.exists(p) for p in GPU_DRIVER_PATHS),
                    reason="a GPU driver is loaded here")
def test_no_gpu_driver_means_no_gpus_without_importing_torch():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    code = "import sys; from pneumo.sweeps.slots import visible_gpus; print(visible_gpus(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["[]", "False"]
