"""`make demo`'s path interrupted with Ctrl-C during training and run again: it finishes, with the
metrics of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

DEMO = [sys.executable, "-m", "caption.demo", "--config", str(ROOT / "configs" / "tiny.yaml"), "--num_images", "120",
        "--max_epochs", "8"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    a = tmp_path_factory.mktemp("demo") / "a"
    r = subprocess.run(DEMO + ["--out", str(a)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return a


@pytest.fixture(scope="module")
def uninterrupted(finished) -> dict:
    return json.loads((finished / "run" / "eval_test" / "metrics.json").read_text())


@pytest.mark.slow
def test_a_finished_demo_run_again_says_what_it_reuses(finished, uninterrupted):
    """Every stage of a finished demo, run again, says it is done instead of redoing it (or printing
    nothing), and the results are the same."""
    r = subprocess.run(DEMO + ["--out", str(finished)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout + r.stderr
    for said in ("images (already generated)", ": reused (trained on", "(already featurized)",
                 "already trained to its end"):
        assert said in out, (said, out[-3000:])
    assert out.count("(already featurized)") == 3 and "batches this run" not in out
    assert json.loads((finished / "run" / "eval_test" / "metrics.json").read_text()) == uninterrupted


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_interrupted_in_training_resumes_to_the_same_metrics(sig, uninterrupted, tmp_path):
    """Ctrl-C (SIGINT) in a terminal, or SIGTERM from a scheduler or `timeout`, during training:
    the state is saved, and the same command again finishes with an uninterrupted run's metrics."""
    b = tmp_path / "b"
    want = uninterrupted
    # the signal reaches the whole process group (as Ctrl-C in a terminal) once training has logged its first steps
    # SIGINT at its default, as in a terminal: a shell's background job (`make test &`) starts with it ignored
    p = subprocess.Popen(DEMO + ["--out", str(b)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = b / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(p.pid, sig)
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0, out[-3000:]
    strict = {"parse_constant": lambda c: f"not JSON: {c}"}  # Python's json would take -Infinity
    progress = json.loads((b / "run" / "state" / "progress.json").read_text(), **strict)
    assert progress["best"] is None or isinstance(progress["best"], float), progress
    assert 0 < progress["step"] < 8 * 24, progress  # stopped mid-way, its state saved
    assert ("interrupted: saving `last`" if sig == signal.SIGINT else "stopped by SIGTERM") in out

    r = subprocess.run(DEMO + ["--out", str(b)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((b / "run" / "eval_test" / "metrics.json").read_text()) == want
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # each logged step once, in order
