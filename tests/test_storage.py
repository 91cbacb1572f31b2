"""--out / --resume on object storage, end to end against a real S3-compatible server on loopback
(moto's server, with credentials checked): run, SIGKILL, a truncated remote checkpoint, resume on
Ray (the actors read and write their checkpoint files in S3 themselves), identical numbers."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from relay_ray import checkpoint, cli
from relay_ray.checkpoint import load_worker, worker_header
from relay_ray.config import RunConfig
from relay_ray.experiment import build_experiment
from relay_ray.simulate import simulate
from relay_ray.storage import Location

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from tests.test_checkpoint import KILLED_AT_75, RUN, TIMING, _config  # noqa: E402  (the local-disk twin of this test)
from tests.test_engine import _assert_same_rows  # noqa: E402

BUCKET = "relay"
CHECK_CREDENTIALS = "ACCESS_DENIED during HeadObject operation: No response body; check the storage credentials"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 that checks credentials (after the 4 set-up calls below), with
    one bucket and one IAM user's key; stopped at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="relay")
        iam.put_user_policy(UserName="relay", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="relay")["AccessKey"]
        credentials = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        boto3.client("s3", **{**setup, "aws_access_key_id": key["AccessKeyId"],
                              "aws_secret_access_key": key["SecretAccessKey"]}).create_bucket(Bucket=BUCKET)
        yield credentials
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3(s3_server, monkeypatch):
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    return s3_server


def _remote_rows(uri):
    lines = Location(f"{uri}/metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _local_rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.ray
def test_killed_run_resumes_from_s3_on_ray_with_identical_numbers(s3, tmp_path):
    uri = f"s3://{BUCKET}/runs/killed"
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_75, "run", *RUN, "--algorithm", "relaysgd", "--tree",
                             "chain", "--out", uri], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert [r["step"] for r in _remote_rows(uri)] == [10, 20, 30, 40, 50, 60, 70]  # pushed at each evaluation
    assert not Location(f"{uri}/summary.json").exists()

    # the newest checkpoint's file of worker 1, cut short in the bucket: the resume must skip it
    newest = Location(f"{uri}/checkpoints/{checkpoint.step_dirname(60)}/{checkpoint.worker_filename(1)}")
    newest.write_bytes(newest.read_bytes()[:100])

    resumed = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--resume", uri, "--backend", "ray",
                              "--quiet"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "worker-00001.pt is truncated or altered (100 of" in resumed.stderr
    assert "resuming from the previous one, step 40" in resumed.stderr

    # the uninterrupted run on local disk: rows up to the checkpoint the resume used are the killed
    # run's own (bit-identical); after it the Ray engine computed them, equal to the simulator up to
    # float summation order, as everywhere else (tests/test_engine.py)
    reference = _config(tmp_path / "ref", tree="chain")
    simulate(reference, progress=False)
    ours, ref = _remote_rows(uri), _local_rows(tmp_path / "ref")
    assert ours[:4] == ref[:4]
    _assert_same_rows(ours, ref)  # the same steps, each once, the same numbers
    summary = json.loads(Location(f"{uri}/summary.json").read_text())
    assert summary["final"]["step"] == 100 and summary["backend"] == "ray"
    # the final checkpoint was written into the bucket by the Ray actors, and holds the reference's models
    header = worker_header(reference, build_experiment(reference).plan)
    final = f"{uri}/checkpoints/{checkpoint.step_dirname(100)}"
    for rank in range(4):
        params = load_worker(final, rank, header)["algorithm"]["params"]
        expected = load_worker(tmp_path / "ref" / "checkpoints" / checkpoint.step_dirname(100), rank, header)
        np.testing.assert_allclose(params, expected["algorithm"]["params"], rtol=1e-5, atol=1e-6)


def test_a_finished_s3_run_is_not_overwritten_and_the_lock_is_released(s3, capsys):
    uri = f"s3://{BUCKET}/runs/once"
    argv = ["run", "--backend", "local", "--dataset", "digits", "--workers", "4", "--steps", "10", "--quiet",
            "--out", uri]
    assert cli.main(argv) == 0
    assert RunConfig.load(f"{uri}/config.yaml").num_workers == 4
    assert not Location(f"{uri}/.lock").exists()
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"relay-ray: error: --out {uri} already holds a run; give --resume {uri} to continue it, --overwrite to "
        "replace it, or another --out")


@pytest.mark.parametrize("where, secret, message", [
    (f"s3://{BUCKET}/runs/denied", "wrong", f"cannot read s3://{BUCKET}/runs/denied/config.yaml: "),
    ("s3://no-such-bucket/run", None, "NO_SUCH_BUCKET"),
    ("nosuchfs://bucket/run", None, "cannot open nosuchfs://bucket/run"),
])
def test_storage_errors_are_one_line_and_exit_2(s3, monkeypatch, capsys, where, secret, message):
    if secret:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--backend", "local", "--dataset", "digits", "--workers", "4", "--steps", "10", "--quiet",
                  "--out", where])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("relay-ray: error: ") and message in err, err
    if secret:
        assert CHECK_CREDENTIALS in err
