"""The one reader of a job's status: running while a process holds its lock, then failed, finished or crashed."""

import json
import signal
import subprocess
import sys
import time

from autoencoders.cli import FAILURE_FILE
from autoencoders.jobs import CRASHED, FAILED, FINISHED, RUNNING, job_order, job_status
from autoencoders.rundirs import LOCK_FILE


def trainer_stand_in(run_dir) -> subprocess.Popen:
    """A process that locks the run dir as rundirs.lock_run_dir does and then waits, as if it were training."""
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom autoencoders.rundirs import lock_run_dir\n"
        "lock_run_dir(Path(sys.argv[1]))\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_job_is_running_while_its_process_lives_and_crashed_once_it_is_killed(tmp_path):
    proc = trainer_stand_in(tmp_path)
    try:
        assert job_status(tmp_path).state == RUNNING
        assert str(job_status(tmp_path)) == f"running: process {proc.pid} is training in it"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    status = job_status(tmp_path)  # the OS released the lock; the process wrote neither metrics nor an error
    assert status.state == CRASHED and "without writing metrics.json or an error" in status.reason
    assert (tmp_path / LOCK_FILE).is_file()  # the lock file stays; only its lock decides


def test_a_failure_record_decides_over_older_metrics_and_finished_jobs_say_when(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    before = time.time()
    assert job_status(tmp_path).state == FINISHED and job_status(tmp_path).since >= before - 2
    (tmp_path / FAILURE_FILE).write_text(json.dumps({"error": "NaN loss at step 3"}))  # a later resume failed
    assert str(job_status(tmp_path)) == "failed: NaN loss at step 3"
    (tmp_path / FAILURE_FILE).write_text("{trunc")
    assert job_status(tmp_path).state == FAILED and "unreadable" in job_status(tmp_path).reason


def test_jobs_sort_by_their_number(tmp_path):
    names = ["10_a", "2_b", "x"]
    assert [p.name for p in sorted((tmp_path / n for n in names), key=job_order)] == ["x", "2_b", "10_a"]
