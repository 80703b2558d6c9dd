"""Dask clusters for --cluster: jobqueue job scripts, their GPU requests, and the errors a user can cause."""

from pathlib import Path

import pytest
import yaml

from pneumo.errors import ClusterError
from pneumo.sweeps.cluster import _command_error, dask_client, gpu_settings, jobqueue_cluster

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"scheduler_options": {"host": "127.0.0.1"}}  # tests never listen beyond this machine


def _cluster_file(tmp_path, kind, **changes):
    settings = yaml.safe_load((ROOT / "params" / "cluster" / f"{kind}.yaml").read_text())
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({**settings, **LOOPBACK, **changes}))
    return path


@pytest.mark.parametrize("kind,expected", [
    ("slurm", ["#SBATCH --gres=gpu:1", "#SBATCH -t 04:00:00", "source ~/miniforge3/bin/activate pneumo"]),
    ("htcondor", ["request_gpus = 1", "+MaxRuntime = 14400", "source ~/miniforge3/bin/activate pneumo"]),
    ("pbs", ["ngpus=1", "walltime=04:00:00", "source ~/miniforge3/bin/activate pneumo"]),
])
def test_job_scripts_request_gpu_walltime_and_environment(tmp_path, kind, expected):
    cluster, jobs, start_timeout = jobqueue_cluster(kind, _cluster_file(tmp_path, kind))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert jobs == 4 and start_timeout == 600  # pneumo's own keys are not passed on
    for line in expected + ["--resources GPU=1"]:  # one worker per job, advertising its GPU
        assert line in script, (line, script)


def test_gpu_requests_keep_what_the_file_already_asks_for():
    slurm = gpu_settings("slurm", {"job_extra_directives": ["--gpus=a100:2"],
                                   "worker_extra_args": ["--lifetime", "1h"]}, 2)
    assert slurm["job_extra_directives"] == ["--gpus=a100:2"]  # no second, conflicting --gres
    assert slurm["worker_extra_args"] == ["--lifetime", "1h", "--resources", "GPU=2"]
    condor = gpu_settings("htcondor", {"job_extra_directives": {"request_gpus": "4"}}, 1)
    assert condor["job_extra_directives"] == {"request_gpus": "4"}
    assert gpu_settings("htcondor", {}, 2)["job_extra_directives"] == {"request_gpus": "2"}
    settings = {"job_extra_directives": ["--constraint=a100"]}
    assert gpu_settings("slurm", settings, 1)["job_extra_directives"] == ["--constraint=a100", "--gres=gpu:1"]
    assert settings == {"job_extra_directives": ["--constraint=a100"]}  # the caller's settings are not changed
    assert gpu_settings("pbs", {}, 1) == {"worker_extra_args": ["--resources", "GPU=1"]}


def test_without_gpus_per_job_no_gpu_is_requested(tmp_path):
    cluster, jobs, _ = jobqueue_cluster("slurm", _cluster_file(tmp_path, "slurm", gpus_per_job=0, jobs=2))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert jobs == 2 and "--gres" not in script and "GPU=" not in script


def test_cluster_errors_name_the_file(tmp_path):
    with pytest.raises(ClusterError, match="no cluster file"):
        dask_client("slurm", cluster_file=tmp_path / "missing.yaml")
    bad = _cluster_file(tmp_path, "slurm", no_such_option=1)
    with pytest.raises(ClusterError, match="slurm.yaml"):
        jobqueue_cluster("slurm", bad)
    with pytest.raises(ClusterError, match="slurm.yaml: jobs, gpus_per_job and start_timeout are numbers"):
        jobqueue_cluster("slurm", _cluster_file(tmp_path, "slurm", start_timeout="soon"))


def test_a_refused_submission_is_its_scheduler_lines_on_one_line():
    text = ("Command exited with non-zero exit code.\nExit code: 1\nCommand:\nsbatch /tmp/tmpab.sh\nstdout:\n\n"
            "stderr:\nsbatch: error: invalid partition specified: nope\n"
            "sbatch: error: Batch job submission failed: Invalid partition name specified\n\n")
    assert _command_error(text) == ("sbatch: error: invalid partition specified: nope; "
                                    "Batch job submission failed: Invalid partition name specified")
    assert _command_error("Command exited with non-zero exit code.\nstdout:\nqsub: no queue\nstderr:\n\n") == (
        "qsub: no queue")
