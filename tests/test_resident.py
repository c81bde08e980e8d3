"""Train features held in memory (`train.features_in_memory`): the same batches as streaming,
bit for bit; the same trained weights; resume mid-epoch; a machine's processes share one copy
(tests/test_recipe.py runs 2 processes on it); a budget too small is a message, not a crash."""

import re
import time

import pytest
import torch
from safetensors.torch import load_file

from caption import train
from caption.data import train_batches
from caption.resident import MemoryBudgetError, ResidentFeatures, choose, resident_batches, shared_path
from caption.vocab import build_from_split_file
from shards import open_store
from tests.conftest import ROOT, tiny_args

CPU = torch.device("cpu")


def assert_same_batches(a: dict, b: dict) -> None:
    assert torch.equal(a["features"], b["features"]) and a["features"].dtype == torch.float16
    for k in ("tokens", "targets", "image_id", "index"):
        assert torch.equal(a[k], b[k]), k
    assert a["keys"] == b["keys"] and a["refs"] == b["refs"]


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_resident_batches_are_the_streamed_batches(shapes, tiny_features, tmp_path, backend):
    root = tiny_features / "train"
    if backend == "wds":
        from shards.__main__ import convert
        convert(root, tmp_path / "train", "wds", shard_size=16)
        root = tmp_path / "train"
    vocab = build_from_split_file(shapes / "dataset.json", 2)
    n = open_store(root).manifest["count"]
    resident = ResidentFeatures(open_store(root), "ram", CPU, progress=False)
    assert resident.nbytes == n * 196 * 256 * 2  # (n, L=196, D=256) float16
    kw = dict(batch_size=8, seq_per_img=3, max_length=6, seed=7)
    for epoch, start in ((0, 0), (1, 0), (2, 5)):  # two shuffles, and a resumed epoch from batch 5
        streamed = list(train_batches(open_store(tiny_features / "train"), vocab, epoch=epoch, start=start, **kw)[1])
        held = list(resident_batches(resident, vocab, epoch=epoch, start=start, **kw))
        ahead = list(resident_batches(resident, vocab, epoch=epoch, start=start, ahead=2, **kw))  # as on a GPU
        assert len(held) == len(ahead) == len(streamed) == 96 // 8 - start
        for a, b, c in zip(held, streamed, ahead):
            assert_same_batches(a, b)
            assert_same_batches(c, b)


def test_batches_made_ahead_stop_with_the_epoch(tiny_features, shapes):
    """Batches made ahead in a thread (training on a GPU) stay at most `ahead` batches ahead,
    and an epoch ended early (max_steps) stops the thread."""
    vocab = build_from_split_file(shapes / "dataset.json", 2)
    resident = ResidentFeatures(open_store(tiny_features / "train"), "ram", CPU, progress=False)
    batches = resident_batches(resident, vocab, batch_size=8, seq_per_img=3, max_length=6, seed=7, epoch=0, ahead=2)
    first = next(batches)
    assert first["features"].shape == (8, 196, 256)  # (B, L, D)
    time.sleep(0.5)
    assert len(batches.waiting) <= 2
    batches.close()
    batches.thread.join(timeout=10)
    assert not batches.thread.is_alive()


def test_the_budget_is_checked_before_loading(tmp_path):
    gb = 1e9
    with pytest.raises(MemoryBudgetError, match=r"--features_in_memory ram: the train features need 2\.00 GB, the budget is 1\.00 GB"):
        choose("ram", int(2 * gb), CPU, budget_gb=1.0)
    with pytest.raises(MemoryBudgetError, match="no GPU"):
        choose("device", 10, CPU)
    assert choose("ram", int(0.5 * gb), CPU, budget_gb=1.0)[0] == "ram"
    where, why = choose("auto", int(2 * gb), CPU, budget_gb=1.0)
    assert where == "off" and "do not fit" in why and "streaming" in why
    assert choose("auto", 10, CPU, budget_gb=1.0)[0] == "ram"
    assert choose("off", 10, CPU)[0] == "off"
    with pytest.raises(MemoryBudgetError, match="/dev/shm"):  # a machine's processes share /dev/shm
        choose("ram", 10**15, CPU, budget_gb=1e7, shared=True)


def test_one_shared_copy_per_machine(tiny_features, tmp_path):
    """A machine's first process fills the shared file while the second waits at the barrier, then
    maps it (two threads stand in for the processes): the same grids as the store's, one copy (the
    second's tensor is a view of the same memory), and no file left in /dev/shm."""
    import threading
    store = open_store(tiny_features / "train")
    path = shared_path(tmp_path / "run")
    assert path.parent.as_posix() == "/dev/shm" and path.name.startswith("image-caption-attention-")
    barrier, held = threading.Barrier(2, timeout=60), {}

    def process(first: bool) -> None:
        held[first] = ResidentFeatures(open_store(tiny_features / "train"), "ram", CPU, progress=False,
                                       shared=(path, first, barrier.wait))

    threads = [threading.Thread(target=process, args=(first,)) for first in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not path.exists()
    a, b = held[True].features, held[False].features
    assert torch.equal(a, b) and torch.equal(a[5], torch.from_numpy(store[5]["features"].reshape(196, 256)))
    a[0, 0, 0] += 1  # one memory: what one process's mapping holds, the other's does
    assert torch.equal(a[0, 0], b[0, 0])


@pytest.mark.slow
def test_training_in_memory_equals_streaming_and_resumes(shapes, tiny_features, tmp_path, capsys, monkeypatch):
    """Held in memory, the same weights as streamed; stopped mid-epoch and resumed with the batches
    made ahead in a thread (as on a GPU), the same again, and the thread gone at the end."""
    import threading
    common = ("--dropout", "0.3", "--max_epochs", "2", "--save_checkpoint_every", "0")
    a, b, c = tmp_path / "streamed", tmp_path / "held", tmp_path / "held_resumed"
    args = lambda run, *extra: tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), *common, *extra)  # noqa: E731
    assert train.main(args(a, "--max_steps", "40")) == 0
    assert train.main(args(b, "--max_steps", "40", "--features_in_memory", "ram")) == 0
    assert "holds all 96 train images (9633792 bytes)" in capsys.readouterr().out  # 96 x 196 x 256 x 2
    monkeypatch.setattr(train, "batches_ahead", lambda device: 2)
    made, real = [], train.resident_batches
    monkeypatch.setattr(train, "resident_batches", lambda *a, **k: made.append(k["ahead"]) or real(*a, **k))
    assert train.main(args(c, "--max_steps", "15", "--features_in_memory", "auto")) == 0  # stops mid-epoch (24 per epoch)
    assert train.main(args(c, "--max_steps", "40", "--features_in_memory", "auto", "--resume", "true")) == 0
    time.sleep(0.5)
    assert made == [2, 2, 2] and not [t for t in threading.enumerate() if t.name == "read-ahead"]  # epoch 0; 0 again, 1
    wa, wb, wc = (load_file(str(r / "last.safetensors")) for r in (a, b, c))
    for k in wa:
        assert torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]), k
    # a budget too small: one line, before any step
    assert train.main(args(tmp_path / "small", "--features_in_memory", "ram", "--memory_budget_gb", "0.0001")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --features_in_memory ram:") and "budget is 0.00 GB" in err[-1]
    assert not (tmp_path / "small" / "state").exists()


def test_two_processes_share_one_copy(shapes, tiny_features, tmp_path, run_torchrun):
    """2 processes on one machine (torchrun: `accelerate launch --cpu` starts one): one copy of the
    96 images in shared memory, the streamed path's 12 batches each, nothing left in /dev/shm.
    (That they follow one process's trajectory: tests/test_recipe.py.)"""
    run = tmp_path / "run"
    r = run_torchrun(ROOT / "caption" / "train.py",
                     *tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--max_epochs", "1",
                                "--num_workers", "0", "--features_in_memory", "ram"))
    out = r.out
    assert r.returncode == 0, out[-3000:]
    assert "2 process(es)" in out
    assert re.findall(r"every process holds all (\d+) train images \((\d+) bytes, one copy shared by this "
                      r"machine's (\d) processes\)", out) == [("96", str(96 * 196 * 256 * 2), "2")], out[-2000:]
    counts = sorted(re.findall(r"rank \d/2: \d+ batches this run", out))
    assert counts == ["rank 0/2: 12 batches this run", "rank 1/2: 12 batches this run"]  # 96 images / (4 x 2)
    assert not shared_path(run).exists()


def test_the_end_to_end_benchmark_runs(capsys, monkeypatch, tmp_path):
    """bench/train_e2e on a tiny decoder: every path trains and reports its ratio (no timing asserted)."""
    from bench import train_e2e
    monkeypatch.chdir(tmp_path)  # its temporary stores go under the working folder
    assert train_e2e.main(["--channels", "16", "--embed", "8", "--hidden", "16", "--attn", "8", "--vocab", "30",
                           "--batch_images", "4", "--steps", "2", "--rounds", "1", "--num_workers", "0"]) == 0
    out = capsys.readouterr().out
    for label in ("model (batches ready", "zarr-blosc-zstd, streamed", "zarr-none, streamed", "wds, streamed",
                  "ram, resident", "ram-ahead, resident"):
        assert re.search(re.escape(label) + r".* captions/s .*x the model step .*waiting", out), label
    assert "device, resident" not in out  # no GPU here: that path is left out


def test_processes_agree_on_the_least_they_can_hold():
    """Where the features go is the least any process can do (-1: one cannot hold an explicit mode):
    Accelerate's reduce has max, not min, so the codes go through it negated."""
    from caption.train import least_over_processes

    class TwoProcesses:  # the other process's code, reduced as torch.distributed would
        device = CPU

        def __init__(self, other: int):
            self.other = other

        def reduce(self, t, reduction):
            assert reduction == "max"
            return torch.maximum(t, torch.tensor(-float(self.other)))

    for mine, other, least in ((2, 1, 1), (1, 2, 1), (1, 1, 1), (2, 0, 0), (1, -1, -1), (-1, 2, -1)):
        assert least_over_processes(TwoProcesses(other), mine) == least
