"""Expected failures end as one message with a known exit status and the MLflow run marked: Ctrl-C and
SIGTERM mid-run (130 / 143, KILLED), a storage error and a lost Ray worker (2), a driver killed outright
(its run marked FAILED at the next start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

import flows.abliterate  # noqa: F401 - registers the abliterate schema the config composes
from flows import _tracking as tracking
from flows._common import run_entry
from tasks.core import storage
from tasks.core.config import MlflowConfig
from tasks.directions.config import AbliterateConfig
from tests.conftest import REPO, compose, tiny_flow_overrides

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _start_flow(model: Path, work: Path) -> subprocess.Popen:
    work.mkdir()
    args = [sys.executable, "-m", "flows.abliterate", *tiny_flow_overrides(model, work)]
    return subprocess.Popen(
        args, cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: Ctrl-C in a terminal reaches the whole group
    )  # fmt: skip


def _runs(work: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_interrupts_end_the_run_killed(tiny_dirs, tmp_path):
    """Ctrl-C (SIGINT to the process group) and SIGTERM (to the driver alone, as `ray job stop` and a pod's
    shutdown send it) during collection: exit 130 / 143, one message, no traceback, the run KILLED,
    nothing saved. Both flows run at once."""
    cases = {"sigint": (signal.SIGINT, True, 130), "sigterm": (signal.SIGTERM, False, 143)}
    procs = {name: _start_flow(tiny_dirs["llama"], tmp_path / name) for name in cases}
    with ThreadPoolExecutor(len(procs)) as threads:  # read both at once: each is signalled as it gets there
        outputs = dict(zip(procs, threads.map(_interrupt, procs.values(), cases.values()), strict=True))
    for name, (_, _, expected) in cases.items():
        output = outputs[name]
        assert procs[name].returncode == expected, output[-3000:]
        assert "Traceback" not in output and "SIGTERM received" not in output  # Ray's handler is not used
        errors = [line for line in output.splitlines() if "[ERROR]" in line]
        assert len(errors) == 1 and "the run is marked KILLED" in errors[0], errors
        (run,) = _runs(tmp_path / name)
        assert run.info.status == "KILLED"
        assert not (tmp_path / name / "checkpoints").exists()


def _interrupt(proc: subprocess.Popen, case: tuple) -> str:
    sig, group, _ = case
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "collect target: started" in line:
            (os.killpg if group else os.kill)(proc.pid, sig)
            break
    output = "".join(lines) + proc.stdout.read()
    proc.wait(timeout=120)
    return output


def _config(overrides: list[str]):
    return compose("abliterate", overrides)


def test_storage_error_is_one_message_and_exit_2(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def body(cfg, raw):
        storage.write_bytes(str(blocker / "x.bin"), b"data")

    with pytest.raises(SystemExit) as exit_info:
        run_entry(_config([f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]), AbliterateConfig, body)
    assert exit_info.value.code == 2
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage().startswith(
        f"storage error: FileExistsError: [Errno 17] File exists: '{blocker}'"
    )
    assert "hydra.verbose=compalign" in record.getMessage()


def test_lost_worker_is_one_message_and_exit_2(ray_local, tmp_path, caplog):
    @ray_local.remote(max_restarts=0)
    class Doomed:
        def die(self) -> None:
            os._exit(1)

    def body(cfg, raw):
        ray_local.get(Doomed.remote().die.remote())

    with pytest.raises(SystemExit) as exit_info:
        run_entry(_config([f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]), AbliterateConfig, body)
    assert exit_info.value.code == 2
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "the Ray cluster lost a process this run needs (ActorDiedError" in record.getMessage()


KILLED_DRIVER = """
import sys, time
import flows.abliterate  # noqa: F401 - registers the abliterate schema the config composes
from flows import _tracking as tracking
from tasks.core.config import MlflowConfig
with tracking.run(MlflowConfig(tracking_uri=sys.argv[1]), "doomed") as active:
    print(active.info.run_id, flush=True)
    time.sleep(600)
"""


def test_killed_driver_run_is_marked_failed_at_next_start(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    driver = subprocess.Popen(
        [sys.executable, "-c", KILLED_DRIVER, uri], env=ENV, stdout=subprocess.PIPE, text=True
    )
    stale_id = driver.stdout.readline().strip()
    driver.kill()  # SIGKILL: nothing in the driver can end its run
    driver.wait()
    cfg = MlflowConfig(tracking_uri=uri)
    tracking.configure(cfg)
    client = MlflowClient()
    assert client.get_run(stale_id).info.status == "RUNNING"
    experiment = client.get_experiment_by_name(cfg.experiment).experiment_id
    me = psutil.Process()
    live = client.create_run(experiment, tags=tracking.driver_tags()).info.run_id  # this process: alive
    reused = client.create_run(  # this pid, another start time: the pid was reused, the driver is gone
        experiment, tags={**tracking.driver_tags(), "driver.started": f"{me.create_time() - 100:.2f}"}
    ).info.run_id
    elsewhere = client.create_run(
        experiment, tags={**tracking.driver_tags(), "driver.host": "another-node", "driver.pid": "1"}
    ).info.run_id

    with tracking.run(cfg, "next") as active:
        pass
    assert client.get_run(active.info.run_id).info.status == "FINISHED"
    stale = client.get_run(stale_id)
    assert stale.info.status == "FAILED"
    assert f"pid {driver.pid}" in stale.data.tags["failure"]
    assert client.get_run(reused).info.status == "FAILED"
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # its driver may be alive on its machine


def test_log_lines_of_a_flow_are_masked(tmp_path, caplog):
    """run_entry masks every handler's records: here a secret in a failure's message."""

    def body(cfg, raw):
        raise ConnectionError("cannot reach https://user:planted-secret@mlflow.lab")

    with pytest.raises(SystemExit):
        run_entry(_config([f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]), AbliterateConfig, body)
    assert "https://***@mlflow.lab" in caplog.text and "planted-secret" not in caplog.text
