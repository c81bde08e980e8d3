"""What clusters do to a training process: SIGTERM (preemption, `timeout`, `docker stop`), SLURM's
SIGUSR1 warning, a second signal during the save, SIGKILL with `save_every_minutes`, launchers that
restart workers (`--resume auto`), and resume state that is damaged or not what it claims."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caption import train
from tests.conftest import ROOT, free_port, tiny_args

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def command(shapes, feats, run, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "caption" / "train.py"),
            *tiny_args(shapes, feats, "--checkpoint_path", str(run), "--max_epochs", "5", "--log_every", "2", *extra)]


def start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_rows(run, p, rows: int = 1, timeout: float = 300) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.01)
    raise AssertionError(f"no metrics rows before the process ended: {p.communicate()[0][-2000:]}")


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(shapes, tiny_features, tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    r = subprocess.run(command(shapes, tiny_features, run), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_and_resume_auto_finishes_as_uninterrupted(sig, shapes, tiny_features, uninterrupted, tmp_path):
    run = tmp_path / "run"
    p = start(command(shapes, tiny_features, run))
    wait_for_rows(run, p)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, out[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in out and "--resume" in out
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert 0 < progress["step"] < 5 * 24, progress
    # A restarted worker (torchrun --max_restarts, a requeued job) continues by itself.
    r = subprocess.run(command(shapes, tiny_features, run, "--resume", "auto"), cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert same_weights(run / "last.safetensors", uninterrupted / "last.safetensors")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_a_second_signal_during_the_save_changes_nothing(shapes, tiny_features, tmp_path):
    run = tmp_path / "run"
    p = start(command(shapes, tiny_features, run))
    wait_for_rows(run, p)
    p.send_signal(signal.SIGTERM)
    while not (run / "state.tmp").exists() and p.poll() is None:  # the save has begun
        time.sleep(0.001)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert out.count("already stopping") <= 1
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--max_epochs", "5",
                                "--log_every", "2", "--resume", "true")) == 0


@pytest.mark.slow
def test_sigkill_loses_at_most_save_every_minutes(shapes, tiny_features, tmp_path):
    run = tmp_path / "run"
    p = start(command(shapes, tiny_features, run, "--save_every_minutes", "0.0005"))  # every step or so
    wait_for_rows(run, p, rows=3)
    p.kill()
    p.communicate()
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert progress["step"] >= 4 and progress["validated_step"] is None, progress  # saved without validating


def test_resume_auto_starts_a_fresh_folder(shapes, tiny_features, tmp_path):
    run = tmp_path / "run"
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--max_steps", "3",
                                "--resume", "auto")) == 0
    assert json.loads((run / "state" / "progress.json").read_text())["step"] == 3


@pytest.mark.parametrize("bad", ["{}", "[1, 2, 3]", '{"epoch": "1", "batch": "x"}', "null"])
def test_a_progress_record_that_is_not_one_is_an_error_and_nothing_is_lost(bad, trained_run, shapes, tiny_features,
                                                                           tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "state" / "progress.json").write_text(bad)
    before = {f: (run / f).read_bytes() for f in ("best.safetensors", "metrics.jsonl", "last.safetensors")}
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--max_epochs", "6",
                                "--resume", "true")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "progress.json" in err[-1] and "progress record" in err[-1] or \
        "not a valid value" in err[-1], err[-3:]
    assert {f: (run / f).read_bytes() for f in before} == before


def test_a_torn_metrics_line_is_dropped_and_a_missing_optimizer_is_one_line(trained_run, shapes, tiny_features, tmp_path,
                                                                            capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # a kill mid-write
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--max_epochs", "5",
                                "--resume", "true", "--learning_rate", "5e-3", "--batch_size", "8")) == 0
    assert "last line is incomplete" in capsys.readouterr().err
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    (run / "state" / "optimizer.bin").unlink()
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--max_epochs", "6",
                                "--resume", "true", "--learning_rate", "5e-3", "--batch_size", "8")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "state" in err[-1] and "cannot be loaded" in err[-1], err[-3:]


@pytest.mark.parametrize("module,args,flag", [
    ("caption.predict", ["--run", "x", "y.jpg", "--max_length", "100000000"], "--max_length"),
    ("caption.evaluate", ["--run", "x", "--beam_size", "1000000"], "--beam_size"),
    ("featurize.synthetic", ["--out", "x", "--num_images", "-1"], "--num_images"),
    ("featurize", ["--config", "configs/tiny.yaml", "--split", "train", "--input_shard_samples", "99999999999"],
     "--input_shard_samples"),
    ("featurize", ["--config", "configs/tiny.yaml", "--split", "train", "--image_size", "1000000000"], "--image_size"),
    ("featurize", ["--config", "configs/tiny.yaml", "--split", "train", "--grid", "100000"], "--grid"),
    ("caption.train", ["--config", "configs/tiny.yaml", "--dist_timeout", "1e300"], "--dist_timeout"),
    ("caption.train", ["--config", "configs/tiny.yaml", "--url_timeout", "inf"], "--url_timeout"),
])
def test_numbers_without_an_upper_bound_are_one_line_errors(module, args, flag, capsys, tmp_path, monkeypatch):
    """The probe's D6, D27 and their kind: a number far beyond any real run is refused at once."""
    import importlib
    monkeypatch.chdir(ROOT)
    mod = importlib.import_module(module if module != "featurize" else "featurize.__main__")
    assert mod.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err


def test_only_collective_failures_count_as_a_lost_peer():
    """A lost node shows as torch.distributed's error or a backend's text; a store read that timed
    out, or a broken pipe to a shard server, is the error it is (not 'lost another process')."""
    from types import SimpleNamespace
    from caption.train import lost_peer
    two = SimpleNamespace(num_processes=2)
    assert lost_peer(two, RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert lost_peer(two, RuntimeError("NCCL communicator was aborted"))
    assert lost_peer(two, torch.distributed.DistBackendError("a collective failed"))
    assert not lost_peer(two, OSError("http://host/features/train/000001.tar: read timed out"))
    assert not lost_peer(two, OSError("[Errno 32] Broken pipe"))
    assert not lost_peer(SimpleNamespace(num_processes=1), RuntimeError("gloo"))


def workers_of(run) -> list[int]:
    """Training processes (not launchers) whose command line names `run`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if d.name.isdigit() and str(run).encode() in cmd and not any(b"torch.distributed.run" in c for c in cmd):
            pids.append(int(d.name))
    return pids


@pytest.mark.slow
def test_a_node_whose_launcher_is_killed_stops_its_worker_and_the_job(shapes, tiny_features, tmp_path):
    """Two nodes (torchrun, 1 process each) on this host; node 1's process group is killed, as a
    scheduler or an operator does: torchrun's agent dies, and its worker (in a session of its own)
    gets the parent-death signal, so it saves with its peer and stops instead of training on as an
    orphan; node 0's command ends with an error well within the run's time."""
    run = tmp_path / "run"
    args = command(shapes, tiny_features, run, "--max_epochs", "50", "--batch_size", "4", "--num_workers", "0")[2:]
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               str(ROOT / "caption" / "train.py"), *args], cwd=ROOT, env=ENV, stdout=open(logs[r], "w"),
                              stderr=subprocess.STDOUT, start_new_session=True) for r in (0, 1)]
    try:
        wait_for_rows(run, procs[0], rows=2)
        os.killpg(procs[1].pid, signal.SIGKILL)  # node 1's agent: its worker is in another session
        procs[0].wait(timeout=120)
        text = logs[0].read_text() + logs[1].read_text()
        assert procs[0].returncode != 0, text[-3000:]
        deadline = time.monotonic() + 30
        while workers_of(run) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not workers_of(run), text[-3000:]  # no orphan trains on
        assert "stopped by SIGTERM" in text, text[-3000:]
        assert json.loads((run / "state" / "progress.json").read_text())["step"] > 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for pid in workers_of(run):
            os.kill(pid, signal.SIGKILL)


def restart_args(shapes, tiny_features, run) -> list[str]:
    return command(shapes, tiny_features, run, "--max_epochs", "4", "--batch_size", "4", "--num_workers", "0",
                   "--save_checkpoint_every", "4", "--resume", "auto")[2:]


@pytest.fixture(scope="module")
def two_process_run(shapes, tiny_features, tmp_path_factory):
    """The restart test's run on 2 processes, not interrupted."""
    run = tmp_path_factory.mktemp("two") / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "caption" / "train.py"), *restart_args(shapes, tiny_features, run)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["standalone", "master_port"])
def test_torchrun_max_restarts_resumes_a_killed_worker_by_itself(rendezvous, shapes, tiny_features, two_process_run,
                                                                 tmp_path):
    """torchrun --max_restarts 1 with --resume auto: a worker killed mid-run (an OOM kill, a bad
    GPU) makes torchrun restart both; they continue from the last saved state and finish the run
    with the steps and the weights of the run never killed, each step logged once. (The restarted
    workers rendezvous under keys of their own attempt: `join_restarted_group`.)"""
    run = tmp_path / "run"
    args = restart_args(shapes, tiny_features, run)
    log = tmp_path / "torchrun.log"
    where = ["--standalone"] if rendezvous == "standalone" else ["--master_port", free_port()]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", "2",
                          "--max_restarts", "1", str(ROOT / "caption" / "train.py"), *args], cwd=ROOT, env=ENV,
                         stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "state" / "progress.json").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = workers_of(run)
        assert len(workers) == 2, log.read_text()[-3000:]
        os.kill(max(workers), signal.SIGKILL)
        assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    steps_per_epoch = 96 // (4 * 2)
    assert json.loads((run / "state" / "progress.json").read_text())["step"] == 4 * steps_per_epoch
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 4 * steps_per_epoch, steps
    assert "restart" in log.read_text().lower()
    assert same_weights(run / "last.safetensors", two_process_run / "last.safetensors")  # as if never killed
