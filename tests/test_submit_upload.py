"""Issue 26: `fitrun submit` uploads a snapshot of the working directory (files written meanwhile cannot break
it) and retries Ray's transient answers (its job agent not up yet, a 5xx) before one clear error."""

from __future__ import annotations

import threading
import time

import pytest

from runner.spec import SpecError
from runner.submit import retrying, snapshot

AGENT = "Request failed with status code 500: No available agent to submit job, please try again later."


def test_the_snapshot_leaves_out_what_the_upload_excludes_and_takes_a_growing_file_as_it_was(tmp_path):
    src, dest = tmp_path / "project", tmp_path / "snap"
    for path in ("jobs/a.yaml", "runner/x.py", "outputs/big.bin", ".venv/lib.py", "mlflow.db", "notes/skip.tmp"):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_text("x")
    (src / ".gitignore").write_text("*.tmp\n")
    dest.mkdir()
    stop = threading.Event()

    def write_log():  # `fitrun submit JOB > submit.log`, as people run it from the project folder
        with open(src / "submit.log", "a") as f:
            while not stop.is_set():
                f.write("line\n")
                f.flush()
    writer = threading.Thread(target=write_log)
    writer.start()
    try:
        time.sleep(0.05)
        copied = snapshot(src, dest)
    finally:
        stop.set()
        writer.join()
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == [".gitignore", "jobs/a.yaml", "runner/x.py", "submit.log"] and copied == 4
    frozen = (dest / "submit.log").read_text()  # the log as it was when copied: a prefix of what it became
    assert frozen and (src / "submit.log").read_text().startswith(frozen)


def test_transient_answers_are_retried_then_said_in_one_line(capsys):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(AGENT)
        return "raysubmit_1"
    assert retrying(flaky, "submit to http://head:8265", attempts=4, first_wait_s=0.01) == "raysubmit_1"
    assert capsys.readouterr().out.count("retrying in") == 2

    def down():
        raise RuntimeError(AGENT)
    with pytest.raises(SpecError) as e:
        retrying(down, "submit to http://head:8265", attempts=2, first_wait_s=0.01)
    assert "did not accept it after 2 tries" in str(e.value) and "No available agent" in str(e.value)

    def refused():
        raise RuntimeError("Request failed with status code 400: bad entrypoint")
    with pytest.raises(RuntimeError, match="status code 400"):  # not transient: not retried
        retrying(refused, "submit", attempts=3, first_wait_s=0.01)
