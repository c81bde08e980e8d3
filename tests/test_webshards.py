"""Image-text input shards (img2dataset's layout) served over HTTP from a real server process:
featurized by two processes through http:// URLs, trained from feature shards served over HTTP,
evaluated; everything equal to the same data read from local paths. And the faults of data in
transit: 404, refused connection, a tar cut short, a .pyd member, a caption that is not UTF-8."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, free_port, same_record
from shards import open_store
from shards.format import StoreError
from shards.imagetext import parse_sample, write_image_text_shards
from shards.karpathy import load_split
from shards.remote import expand, read_bytes, tar_samples

TINY = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--format", "wds", "--input_shard_samples", "16"]


def jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_input_shards(world: Path, out: Path, split: str, per_shard: int = 16) -> list[Path]:
    """The shapes world's split as img2dataset shards: .jpg + .txt (the first caption) + .json
    (img2dataset's metadata; every other sample also lists all its captions)."""
    entries = load_split(world / "dataset.json", split)

    def samples():
        for i, e in enumerate(entries):
            key = f"{split[0]}{i:08d}"
            meta = {"key": key, "status": "success", **({"captions": e.raw} if i % 2 else {})}
            yield key, {"jpg": jpeg(world / e.filename), "txt": e.raw[0].encode(), "json": json.dumps(meta).encode()}
    return write_image_text_shards(samples(), out / split, per_shard)


@pytest.fixture(scope="module")
def served(shapes, tmp_path_factory):
    """(root folder, base URL) of `python -m http.server` on 127.0.0.1 serving the input shards."""
    root = tmp_path_factory.mktemp("served")
    for split in ("train", "val"):
        make_input_shards(shapes, root / "in", split)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1", "--directory", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):  # until the local server answers
        try:
            conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=1)
            conn.request("HEAD", "/")
            conn.getresponse()
            conn.close()
            break
        except OSError:
            time.sleep(0.1)
    yield root, base
    server.terminate()
    server.wait(timeout=10)


@contextmanager
def one_reply_server(reply: str, *argv: str) -> Iterator[str]:
    """A misbehaving HTTP server: it takes one request, then runs `reply` (Python: the connection is
    `c`, its arguments `sys.argv`; socket, sys and time imported). Yields its base URL; killed after."""
    port = free_port()
    code = ("import socket,sys,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('127.0.0.1',{port}));s.listen(1)\nc,_=s.accept();c.recv(65536)\n" + reply)
    server = subprocess.Popen([sys.executable, "-c", code, *argv])
    try:
        time.sleep(0.5)  # listening (a probe would take its one connection)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()


def featurize(args: list[str], processes: int = 1, read_ahead: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHARDS_READ_AHEAD": "1" if read_ahead else "0"}
    if processes == 1:
        cmd = [sys.executable, "-m", "featurize", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", free_port(), "-m", "featurize", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def both(served, tmp_path_factory):
    """The same shards featurized from local paths (1 process, read on its thread) and through
    http:// (2 processes, 2 workers each, each shard received by a thread of its own), with one backbone (calibrated on the shards' first images, then copied)."""
    root, base = served
    local, http = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("http")
    for split, n in (("train", 6), ("val", 1)):
        last = f"{n - 1:05d}"
        featurize([*TINY, "--features", str(local), "--split", split, "--shards_split", split,
                   "--input_shards", f"{root}/in/{split}/{{00000..{last}}}.tar"])
        if split == "train":
            for f in ("backbone.safetensors", "backbone.json"):
                (http / f).write_bytes((local / f).read_bytes())
        featurize([*TINY, "--features", str(http), "--split", split, "--shards_split", split, "--num_workers", "2",
                   "--input_shards", f"{base}/in/{split}/{{00000..{last}}}.tar"], processes=2, read_ahead=True)
    return local, http


@pytest.mark.slow
def test_http_featurize_two_processes_equals_local(both):
    local, http = both
    for split, n in (("train", 96), ("val", 12)):
        a, b = list(open_store(local / split)), list(open_store(http / split))
        assert len(a) == len(b) == n
        assert [r["key"] for r in a] == [r["key"] for r in b]
        assert all(same_record(x, y) for x, y in zip(a, b))  # bit-exact grids, same metadata
    m = json.loads((http / "train" / "manifest.json").read_text())
    assert m["source_urls"][0].startswith("http://127.0.0.1:") and len(m["source_urls"]) == 6
    assert m["input_json"] == "" and m["failures"] == []
    rec = a[1]
    assert rec["filename"] == "00000.tar#v00000001" and len(rec["captions"]) == 5  # .json's list: 5 references
    assert len(a[0]["captions"]) == 1  # .txt only


@pytest.mark.slow
def test_train_from_http_feature_shards_equals_local(both, served, tmp_path, monkeypatch):
    """Feature shards served over HTTP stream into training (no Karpathy file: vocabulary and
    validation references from the records; each shard received by a thread of its own); same weights and
    the same evaluation as from the folder."""
    import shards.remote as remote
    from caption import evaluate, train
    local, _ = both
    root, base = served
    (root / "features").symlink_to(local, target_is_directory=True)
    runs = {}
    for name, features in (("local", str(local)), ("http", f"{base}/features")):
        monkeypatch.setattr(remote, "READ_AHEAD", name == "http")
        run = tmp_path / name
        assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--features", features, "--input_json", "",
                           "--checkpoint_path", str(run), "--max_epochs", "2", "--batch_size", "8",
                           "--num_workers", "0"]) == 0
        assert evaluate.main(["--run", str(run), "--split", "val"]) == 0
        runs[name] = run
    wa, wb = load_file(str(runs["local"] / "last.safetensors")), load_file(str(runs["http"] / "last.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)
    ra = json.loads((runs["local"] / "eval_val" / "results.json").read_text())
    rb = json.loads((runs["http"] / "eval_val" / "results.json").read_text())
    assert ra == rb and len(ra) == 12
    assert (runs["local"] / "vocab.json").read_text() == (runs["http"] / "vocab.json").read_text()
    # its model card says what it read (the input shards, not a split file) and scores validation (no test split)
    from huggingface_hub import ModelCard
    from caption.export import export
    card = ModelCard.load(export(runs["local"], tmp_path / "exported") / "README.md")
    assert card.data.pipeline_tag == "image-to-text" and card.data.datasets[0].endswith(".tar")
    assert "input_shards" not in card.text and "image-text shards" in card.text and "dataset.json" not in card.text
    result = card.data.eval_results[0]
    assert result.dataset_split == "validation" and result.metric_name in ("CIDEr", "Bleu_4")


@pytest.mark.slow
def test_http_features_in_forkserver_workers_stop_at_sigterm_and_resume(both, served, tmp_path):
    """What a cluster runs on a web store: training streamed from http:// in a DataLoader worker that
    forkserver started, each shard received by a thread of its own in that worker; SIGTERM mid-run
    saves and stops (exit 143), and `--resume auto` finishes with the steps in order."""
    local, _ = both
    root, base = served
    (root / "features_signal").symlink_to(local, target_is_directory=True)
    run = tmp_path / "run"
    script = ("import multiprocessing, sys\nmultiprocessing.set_start_method('forkserver', force=True)\n"
              "from caption import train\nraise SystemExit(train.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", script, "--config", str(ROOT / "configs" / "tiny.yaml"), "--features",
           f"{base}/features_signal", "--input_json", "", "--checkpoint_path", str(run), "--max_epochs", "4",
           "--batch_size", "8", "--num_workers", "1", "--log_every", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SHARDS_READ_AHEAD": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline and not (
            metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()[0][-3000:]
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out[-3000:]
    stopped = json.loads((run / "state" / "progress.json").read_text())["step"]
    assert 0 < stopped < 4 * 96 // 8, stopped
    r = subprocess.run([*cmd, "--resume", "auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] > stopped and (run / "last.safetensors").exists()
    assert json.loads((run / "state" / "progress.json").read_text())["step"] == 4 * 96 // 8


@pytest.mark.slow
def test_resume_by_input_shard(served, tmp_path, copy_backbone, both):
    """A half-written input shard (some output shards, no marker) is redone whole; finished ones are kept."""
    local, _ = both
    root, _ = served
    out = copy_backbone(local, tmp_path / "f")
    args = [*TINY, "--features", str(out), "--split", "train", "--input_shards", f"{root}/in/train/{{00000..00005}}.tar"]
    featurize(args)
    marker = out / "train" / "inputs" / "000002.json"
    kept = (out / "train" / "shards" / "000000.json").stat().st_mtime_ns
    marker.unlink()
    (out / "train" / "shards" / "000005.json").unlink()  # input shard 2 owns output shards 4 and 5
    (out / "train" / "manifest.json").unlink()
    featurize(args)
    assert marker.exists() and (out / "train" / "shards" / "000000.json").stat().st_mtime_ns == kept
    assert all(same_record(x, y) for x, y in zip(open_store(out / "train"), open_store(local / "train")))


# ---- reading ahead -------------------------------------------------------------------------------
def test_read_ahead_gives_every_member_in_order_bit_equal(served):
    """A streamed tar received by a thread gives what the consumer's own reads give, in order."""
    from shards.remote import tar_members
    _, base = served
    url = f"{base}/in/train/00000.tar"
    inline = [(m["fname"], bytes(m["data"])) for m in tar_members(url, read_ahead=False)]
    ahead = [(m["fname"], bytes(m["data"])) for m in tar_members(url, read_ahead=True)]
    assert ahead == inline and len(inline) == 3 * 16  # 16 samples: an image, a caption, a .json


def test_an_http_shard_gets_a_wide_receive_buffer_as_far_as_the_system_allows(served, monkeypatch):
    """Each HTTP shard's socket gets RECEIVE_BUFFER bytes of receive buffer (the kernel doubles
    it) up to net.core.rmem_max, below 1 MiB of allowance the kernel's own sizing; 0 leaves it to
    the kernel; the bytes read are the same either way."""
    from shards import remote
    _, base = served
    url = f"{base}/in/train/00000.tar"

    def opened(size: int) -> tuple[int, bytes]:
        monkeypatch.setattr(remote, "RECEIVE_BUFFER", size)
        with remote.open_stream(url) as response:
            with socket.socket(fileno=os.dup(response.fileno())) as sock:
                buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            return buffer, response.read()

    kernel, data = opened(0)
    allowed = remote._system_receive_limit()
    wide, same = opened(4 << 20)
    assert same == data and len(data) > 0
    if allowed >= 1 << 20:
        assert wide == 2 * min(4 << 20, allowed) != kernel
    else:
        assert wide == kernel
    monkeypatch.setattr(remote, "_system_receive_limit", lambda: 512 << 10)  # a system allowing less
    assert opened(4 << 20)[0] == kernel
    script = ("import os, socket, sys; from shards import remote\n"
              "with remote.open_stream(sys.argv[1]) as r, socket.socket(fileno=os.dup(r.fileno())) as s:\n"
              "    print(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))")
    env = {k: v for k, v in os.environ.items() if k != "SHARDS_RECEIVE_BUFFER"} | {"PYTHONPATH": str(ROOT)}
    for setting, want in (({"SHARDS_RECEIVE_BUFFER": "0"}, kernel), ({}, wide)):  # as the README says; the default
        out = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, check=True,
                             cwd=ROOT, env=env | setting)
        assert int(out.stdout) == want


def test_read_ahead_holds_at_most_its_limit_and_stops_with_its_consumer():
    """The thread stays at most `limit` bytes (or one member) ahead of a slow consumer; when the
    consumer stops early it ends at its next member and closes its stream; an error comes after
    the members before it."""
    from shards.ahead import ReadAhead
    nbytes = lambda member: member[1].nbytes  # noqa: E731
    made, closed = [], threading.Event()

    def members(n, fail=False):
        try:
            for i in range(n):
                made.append(i)
                yield f"m{i}", np.full(1000, i % 256, dtype=np.uint8)
            if fail:
                raise StoreError("x.tar: torn")
        finally:
            closed.set()

    got = []
    for name, data in ReadAhead(members(100), limit=3500, cost=nbytes):
        time.sleep(0.01)  # a slow consumer
        # 1 in hand, 4 waiting (each added while fewer than 3,500 bytes wait), 1 read and held back
        assert len(made) - len(got) <= 6, (len(made), len(got))
        got.append((name, int(data[0])))
    assert got == [(f"m{i}", i) for i in range(100)] and closed.is_set()

    made.clear()
    closed.clear()
    reader = ReadAhead(members(10_000), limit=3500, cost=nbytes)
    it = iter(reader)
    assert next(it)[0] == "m0"
    it.close()
    reader.thread.join(timeout=10)
    assert not reader.thread.is_alive() and closed.is_set() and len(made) < 10

    out = []
    with pytest.raises(StoreError, match="x.tar: torn"):
        for name, _ in ReadAhead(members(7, fail=True), limit=1 << 20, cost=nbytes):
            out.append(name)
    assert out == [f"m{i}" for i in range(7)]


def test_receive_ahead_gives_the_bytes_in_order_and_holds_at_most_its_buffers():
    """Bytes received by the thread come out as the source gave them, whatever the reads' sizes on
    either side; a slow consumer has at most `buffers` buffers received ahead; an error comes
    after the reads before it; a finished stream's buffers serve the next one."""
    from shards import ahead
    from shards.ahead import ReceiveAhead
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()

    class Source:
        def __init__(self, fail_at=None):
            self.at, self.fail_at = 0, fail_at

        def readinto(self, b):
            if self.fail_at is not None and self.at >= self.fail_at:
                raise StoreError("x.tar: the transfer has stalled")
            k = min(len(b), int(rng.integers(1, 3000)), len(data) - self.at)
            if self.fail_at is not None:
                k = min(k, self.fail_at - self.at)
            memoryview(b)[:k] = data[self.at:self.at + k]
            self.at += k
            return k

    source = Source()
    got = bytearray()
    with ReceiveAhead(source, size=4096, buffers=2) as f:
        got += f.read(1)
        time.sleep(0.2)  # a slow consumer: one buffer in hand, one received and waiting
        assert source.at <= 2 * 4096
        while True:
            n = int(rng.integers(1, 10_000))
            if rng.random() < 0.5:
                chunk = f.read(n)
            else:
                out = np.empty(n, np.uint8)
                chunk = out[:f.readinto(out)].tobytes()
            got += chunk
            if len(chunk) < n:
                break
        assert f.read(10) == b""
    assert bytes(got) == data
    assert not f.thread.is_alive()
    kept = [id(b) for b in ahead._SPARE[4096]]
    with ReceiveAhead(Source(), size=4096, buffers=2) as g:
        assert {id(b) for b in g.owned} <= set(kept) and len(g.owned) == 2  # the same memory again

    got = bytearray()
    with pytest.raises(StoreError, match="stalled"):
        with ReceiveAhead(Source(fail_at=10_000), size=4096, buffers=2) as f:
            while chunk := f.read(777):
                got += chunk
    assert data.startswith(bytes(got)) and len(got) > 10_000 - 777  # every whole read before the error


def test_receive_ahead_stops_at_once_when_its_consumer_stops_on_a_stalled_server(tmp_path):
    """The consumer stopping while the thread waits in a read on a server that sent part of a shard
    and then nothing: the thread woken (its socket shut down) and gone at once, not at the
    timeout (without the wake-up: the 60 s timeout)."""
    from shards.remote import tar_members
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    write_image_text_shards(iter([("k0", {"jpg": b"x" * 100, "txt": b"a"}), ("k1", {"jpg": big, "txt": b"b"})]),
                            tmp_path, 16)
    reply = ("d=open(sys.argv[1],'rb').read()\n"  # k0's members; a second later the start of k1's; then nothing
             "c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(d) + d[:2048])\n"
             "time.sleep(1);c.sendall(d[2048:12288]);time.sleep(600)")
    with one_reply_server(reply, str(tmp_path / "00000.tar")) as base:
        members = tar_members(f"{base}/x.tar", timeout=60, read_ahead=True)  # k0 in the first buffer, held here
        assert next(members)["fname"] == "k0.jpg"
        t0 = time.monotonic()
        members.close()
        assert time.monotonic() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "receive-ahead"]


# ---- faults in transit --------------------------------------------------------------------------
@pytest.mark.usefixtures("read_ahead")
def test_404_and_refused_name_the_url(served):
    _, base = served
    with pytest.raises(StoreError, match=r"/in/train/99999\.tar: HTTP 404"):
        list(tar_samples(f"{base}/in/train/99999.tar"))
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1/x\.tar: cannot connect"):
        list(tar_samples("http://127.0.0.1:1/x.tar", timeout=5))


@pytest.mark.slow
def test_featurize_404_is_one_line_and_writes_nothing_complete(served, tmp_path, copy_backbone, both, capsys):
    import featurize.__main__ as fz
    _, base = served
    out = copy_backbone(both[0], tmp_path / "f")
    rc = fz.main([*TINY, "--features", str(out), "--split", "train", "--num_workers", "0",
                  "--input_shards", f"{base}/in/train/{{00004..00006}}.tar"])
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert rc == 1 and len(err) == 1 and "/in/train/00006.tar: HTTP 404" in err[0]
    assert not (out / "train" / "manifest.json").exists()


@pytest.mark.usefixtures("read_ahead")
@pytest.mark.parametrize("where", ["mid-member", "member boundary", "no end blocks"])
def test_truncated_tar_in_transit(served, where):
    root, base = served
    data = (root / "in" / "train" / "00000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    last_end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    at = {"mid-member": members[4].offset_data + 100, "member boundary": members[6].offset, "no end blocks": last_end}[where]
    (root / "cut.tar").write_bytes(data[:at])
    with pytest.raises(StoreError, match=r"cut\.tar: (torn|the transfer)"):
        list(tar_samples(f"{base}/cut.tar"))
    (root / "cut.tar").unlink()


@pytest.mark.usefixtures("read_ahead")
def test_short_http_body_is_named(served):
    """A whole tar sent by a server that promised more bytes (Content-Length) and closed: the tar
    parses, its end blocks are there, and the transfer is still named as cut short."""
    root, _ = served
    reply = ("d=open(sys.argv[1],'rb').read()\n"
             "c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n' % (len(d) + 5000) + d);c.close()")
    with one_reply_server(reply, str(root / "in" / "train" / "00000.tar")) as base:
        with pytest.raises(StoreError, match=r"x\.tar: the transfer was cut short \(5000 bytes"):
            list(tar_samples(f"{base}/x.tar", timeout=10))


@pytest.mark.usefixtures("read_ahead")
def test_a_server_that_stops_mid_member_times_out(tmp_path):
    """A server that sends the headers and part of a large member, then nothing, keeping the
    connection open: the member's read ends at the timeout, a StoreError naming the URL and the
    member before, not a hang (received on the consumer's thread and by a thread of its own)."""
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    write_image_text_shards(iter([("k0", {"jpg": b"x" * 100, "txt": b"a"}), ("k1", {"jpg": big, "txt": b"b"})]),
                            tmp_path, 16)
    reply = ("d=open(sys.argv[1],'rb').read()\n"
             "c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(d) + d[:len(d) // 2])\n"
             "time.sleep(600)")
    with one_reply_server(reply, str(tmp_path / "00000.tar")) as base:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"x\.tar: the transfer (failed after k0\.txt \(.*timed out|has stalled)"):
            list(tar_samples(f"{base}/x.tar", timeout=1.0))
        assert time.monotonic() - t0 < 10


@pytest.mark.slow
def test_bad_samples_are_listed_failures(served, shapes, tmp_path, copy_backbone, both):
    """A .pyd member, a caption that is not UTF-8, a sample without an image, one without a
    caption: each a listed failure naming shard and key; the good samples are featurized."""
    root, _ = served
    good = jpeg(shapes / load_split(shapes / "dataset.json", "train")[0].filename)
    samples = [("k0", {"jpg": good, "txt": b"a red square"}),
               ("k1", {"jpg": good, "txt": b"a red square", "pyd": b"cos\nsystem\n"}),
               ("k2", {"jpg": good, "txt": "un carr\u00e9".encode("latin-1")}),
               ("k3", {"txt": b"no image here"}),
               ("k4", {"jpg": good, "json": b'{"status": "success"}'}),
               ("k5", {"jpg": b"not a jpeg", "txt": b"a blue circle"})]
    write_image_text_shards(iter(samples), root / "bad", 16)
    reasons = {s[0]: parse_sample({"__key__": s[0], **s[1]}) for s in samples}
    assert "refusing member(s) .pyd" in reasons["k1"] and "not UTF-8" in reasons["k2"]
    assert "no image" in reasons["k3"] and "no caption" in reasons["k4"]
    import featurize.__main__ as fz
    out = copy_backbone(both[0], tmp_path / "f")
    assert fz.main([*TINY, "--features", str(out), "--split", "train", "--input_shards", f"{root}/bad/00000.tar"]) == 0
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert m["count"] == 1
    failed = {f["filename"]: f["reason"] for f in m["failures"]}
    assert set(failed) == {f"00000.tar#k{i}" for i in range(1, 6)}
    assert "cannot decode" in failed["00000.tar#k5"] or "identify" in failed["00000.tar#k5"]


@pytest.mark.usefixtures("read_ahead")
def test_expand_and_pipe(served, tmp_path):
    root, _ = served
    assert len(expand(f"{root}/in/train/{{00000..00005}}.tar")) == 6
    urls = expand(f"pipe:cat {root}/in/train/{{00000..00001}}.tar")
    assert urls == [f"pipe:cat {root}/in/train/00000.tar", f"pipe:cat {root}/in/train/00001.tar"]
    assert len(list(tar_samples(urls[0]))) == 16
    with pytest.raises(StoreError, match="exited with status"):
        list(tar_samples(f"pipe:cat {tmp_path}/missing.tar"))


# ---- two "machines" on this host ----------------------------------------------------------------
def node(rank: int, port: str, args: list[str], log: Path) -> subprocess.Popen:
    """One node of a 2-node torchrun job (1 process each) on 127.0.0.1, gloo on CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
           "1", "--master_addr", "127.0.0.1", "--master_port", port, str(ROOT / "caption" / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_two_nodes_one_process_each(shapes, tiny_features, tmp_path):
    from conftest import tiny_args
    port = free_port()
    args = tiny_args(shapes, tiny_features, "--checkpoint_path", str(tmp_path / "run"), "--max_epochs", "1",
                     "--batch_size", "4", "--num_workers", "0")
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    procs = [node(r, port, args, logs[r]) for r in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, "\n".join(log.read_text()[-3000:] for log in logs)
    text = logs[0].read_text() + logs[1].read_text()
    assert "2 process(es)" in text
    import re
    counts = dict(re.findall(r"rank (\d)/2: (\d+) batches this run", text))
    assert set(counts) == {"0", "1"} and counts["0"] == counts["1"] and int(counts["0"]) > 0, text[-2000:]



def img2dataset_output(world: Path, out: Path, per_shard: int, split: str = "train") -> list[Path]:
    """The split as img2dataset writes it with number_sample_per_shard = per_shard, ~20% of the URLs
    failing: NNNNN.tar holds only the successes (keys shard * per_shard + index, 9 digits, so a
    shard's keys have gaps), NNNNN_stats.json beside it (count, successes, failed_to_download, ...)
    and NNNNN.parquet (a stand-in: featurize reads the tars and the stats files only)."""
    entries = load_split(world / "dataset.json", split)
    out.mkdir(parents=True, exist_ok=True)
    tars, it, shard = [], iter(entries), 0
    while True:
        members, tried = [], 0
        for j in range(per_shard):
            if j % 5 == 4:  # this URL failed to download: no sample, a row of the parquet only
                tried += 1
                continue
            e = next(it, None)
            if e is None:
                break
            tried += 1
            key = f"{shard * per_shard + j:09d}"
            meta = {"key": key, "status": "success", "caption": e.raw[0], "url": f"http://example.com/{key}.jpg"}
            members.append((key, {"jpg": jpeg(world / e.filename), "txt": e.raw[0].encode(), "json": json.dumps(meta).encode()}))
        if not members:
            return tars
        tars += write_image_text_shards(iter(members), out / f"tmp{shard}", per_shard)
        tars[-1] = tars[-1].rename(out / f"{shard:05d}.tar")
        (out / f"tmp{shard}").rmdir()
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": tried, "successes": len(members), "failed_to_download": tried - len(members), "failed_to_resize": 0,
             "duration": 1.0, "status_dict": {"success": len(members)}}))
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
        shard += 1


@pytest.mark.parametrize("per_shard", [20, 10_000])
def test_img2dataset_output_rows_are_its_successes(shapes, tmp_path, per_shard):
    """img2dataset's output at its shard size (20: many shards of 16 successes; 10,000: one shard),
    featurized into zarr shards of 6 rows (so output shards straddle input shards): the store's rows
    are exactly the successes (no empty output shard, no unfilled row), and a run killed after some
    units, with a unit half written, resumes to the same store."""
    import featurize.__main__ as fz
    import zarr
    src = tmp_path / "in"
    tars = img2dataset_output(shapes, src, per_shard)
    successes = sum(json.loads((t.parent / f"{t.stem}_stats.json").read_text())["successes"] for t in tars)
    assert successes == 96 and len(tars) == (6 if per_shard == 20 else 1)
    args = [*TINY, "--format", "zarr", "--shard_images", "6", "--input_shard_samples", "10000", "--split", "train",
            "--input_shards", str(src / ("{00000..%05d}.tar" % (len(tars) - 1)))]
    out = tmp_path / "f"
    assert fz.main([*args, "--features", str(out)]) == 0
    root = out / "train"
    m = json.loads((root / "manifest.json").read_text())
    assert m["count"] == m["num_rows"] == successes and not m["failures"]
    assert m["input_counts_from"] == "img2dataset's NNNNN_stats.json"
    assert m["num_shards"] == 16 and all(s["count"] == 6 for s in m["shards"])  # none empty, none partial
    assert zarr.open_group(str(root), mode="r")["features.zarr"].shape[0] == successes
    store = [r for r in open_store(root)]
    assert [r["key"] for r in store] == sorted(r["key"] for r in store)  # the tars' order, every key once
    markers = sorted((root / "inputs").glob("0*.json"))
    assert [json.loads(f.read_text())["url"] for f in markers] == [str(t) for t in tars]
    assert sum(json.loads(f.read_text())["rows"] for f in markers) == successes
    # a run killed mid-way: the last unit half written (one output shard, no marker), no manifest
    last = len(tars) - 1
    (root / "inputs" / f"{last:06d}.json").unlink()
    (root / "shards" / "000015.json").unlink()
    (root / "manifest.json").unlink()
    before = {f.name: f.read_bytes() for f in (root / "shards").glob("*.json")}
    assert fz.main([*args, "--features", str(out)]) == 0
    fresh = tmp_path / "g"
    assert fz.main([*args, "--features", str(fresh)]) == 0
    assert all(same_record(x, y) for x, y in zip(open_store(root), open_store(fresh / "train")))
    kept = {f.name: f.read_bytes() for f in (root / "shards").glob("*.json") if f.name in before}
    assert kept == before if per_shard == 20 else len(kept) == len(before)  # the finished units not redone


@pytest.mark.slow
def test_a_featurize_killed_mid_run_resumes_to_the_same_store(shapes, tmp_path):
    """SIGKILL (what a preempted node gets) once the first input shard is done; the rerun redoes only
    the unfinished units and the store equals one written without a kill."""
    import signal
    src = tmp_path / "in"
    img2dataset_output(shapes, src, 20)
    args = [*TINY, "--format", "zarr", "--shard_images", "6", "--split", "train", "--batch_size", "4",
            "--input_shards", str(src / "{00000..00005}.tar")]
    out = tmp_path / "f"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "featurize", *args, "--features", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "train" / "inputs" / "000000.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert first.exists() and not (out / "train" / "manifest.json").exists(), "the run was not stopped mid-way"
    done_before = sorted(f.name for f in (out / "train" / "inputs").glob("0*.json"))
    assert len(done_before) < 6
    featurize([*args, "--features", str(out)])
    featurize([*args, "--features", str(tmp_path / "g")])
    a, b = open_store(out / "train"), open_store(tmp_path / "g" / "train")
    assert len(a) == len(b) == 96 and all(same_record(x, y) for x, y in zip(a, b))
    assert json.loads((out / "train" / "manifest.json").read_text())["num_rows"] == 96


def test_counts_that_disagree_with_the_tars(shapes, tmp_path, capsys):
    """A stats file counting more samples than its tar: the rows it lacks are listed failures and the
    next shard's samples keep their rows; counting fewer: an error naming the URL."""
    import featurize.__main__ as fz
    src = tmp_path / "in"
    tars = img2dataset_output(shapes, src, 20)
    stats = src / "00001_stats.json"
    s = json.loads(stats.read_text())
    stats.write_text(json.dumps({**s, "successes": s["successes"] + 2}))
    args = [*TINY, "--format", "zarr", "--shard_images", "6", "--split", "train",
            "--input_shards", str(src / "{00000..00005}.tar")]
    assert fz.main([*args, "--features", str(tmp_path / "f")]) == 0
    m = json.loads((tmp_path / "f" / "train" / "manifest.json").read_text())
    assert m["num_rows"] == 98 and m["count"] == 96 and len(m["failures"]) == 2
    assert all("00001.tar#<sample" in f["filename"] and "counts more samples" in f["reason"] for f in m["failures"])
    stats.write_text(json.dumps({**s, "successes": s["successes"] - 1}))
    assert fz.main([*args, "--features", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err
    assert f"{tars[1]}: holds more than the 15 samples its NNNNN_stats.json counts" in err, err


def test_without_stats_local_tars_are_counted_and_urls_reserve_rows(shapes, tmp_path, caplog):
    """Local tars without stats files are counted (the same store as with them); shards whose count
    cannot be known before reading (http(s), pipe:) reserve --input_shard_samples rows, with a warning."""
    from featurize.inputs import layout
    src = tmp_path / "in"
    tars = img2dataset_output(shapes, src, 20)
    for f in src.glob("*_stats.json"):
        f.unlink()
    lay = layout([str(t) for t in tars], 10_000, 6)
    assert lay.exact and lay.counts == (16,) * 6 and lay.source == "counts of the local tars"
    assert lay.counts[0] == sum(1 for _ in tar_samples(str(tars[0])))  # counted as the reader reads
    torn = tmp_path / "torn.tar"
    torn.write_bytes(tars[0].read_bytes()[:tars[0].stat().st_size // 2])
    with pytest.raises(StoreError, match=r"torn.tar: cannot count its samples \(torn shard"):
        layout([str(torn)], 10_000, 6)
    piped = layout([f"pipe:cat {t}" for t in tars], 10_000, 6)
    assert not piped.exact and piped.counts == (10_002,) * 6  # whole output shards of 6
    import featurize.__main__ as fz
    with caplog.at_level("WARNING"):
        assert fz.main([*TINY, "--input_shard_samples", "16", "--shard_images", "8", "--split", "train", "--features",
                        str(tmp_path / "f"), "--input_shards", "pipe:cat " + str(src / "{00000..00005}.tar")]) == 0
    assert "16 rows reserved per input shard" in caplog.text


@pytest.mark.usefixtures("read_ahead")
def test_url_timeout_reaches_the_index_and_every_stream(served, tiny_features, shapes, monkeypatch):
    """`data.url_timeout` is the seconds per connect and read of everything a run fetches from a
    store at a URL: the manifest and shard JSONs, the evaluation reads and training's streams."""
    import shards.remote as remote
    import shards.remote_store as remote_store
    from caption.data import train_batches
    from caption.splits import open_split
    from caption.vocab import build_from_split_file
    from shards.__main__ import convert
    root, base = served
    convert(tiny_features / "val", root / "wds_t" / "val", "wds", shard_size=4)
    seen = []
    read_bytes, tar_members = remote_store.read_bytes, remote._tar_members
    monkeypatch.setattr(remote_store, "read_bytes", lambda url, timeout: seen.append(("json", timeout)) or
                        read_bytes(url, timeout))
    monkeypatch.setattr(remote, "_tar_members", lambda url, timeout, *rest: seen.append(("tar", timeout)) or
                        tar_members(url, timeout, *rest))
    split = open_split(f"{base}/wds_t/val", "val", url_timeout=7.5)
    assert len(list(split.records())) == 12
    vocab = build_from_split_file(shapes / "dataset.json", 0)
    batch = next(iter(train_batches(split.store, vocab, batch_size=4, seq_per_img=5, max_length=16, seed=0, epoch=0)[1]))
    assert batch["features"].shape[0] == 4
    kinds = {k for k, _ in seen}
    assert kinds == {"json", "tar"} and {t for _, t in seen} == {7.5}, seen


def test_duplicate_keys_across_input_shards_name_the_input_shards(shapes, tmp_path, capsys):
    """Probe D11: an input shard listed twice is refused before any work; two input shards holding
    the same keys (a copy under another name) stop at the end with a line naming both input
    shards and what to do, not only an output shard's JSON."""
    import shutil
    import featurize.__main__ as fz
    make_input_shards(shapes, tmp_path / "in", "val", per_shard=16)
    first = tmp_path / "in" / "val" / "00000.tar"
    assert fz.main([*TINY, "--features", str(tmp_path / "f1"), "--split", "train", "--num_workers", "0",
                    "--input_shards", f"{first} {first}"]) == 1
    err = capsys.readouterr().err
    assert f"{first} is listed twice" in err and not (tmp_path / "f1" / "train").exists()
    shutil.copy(first, tmp_path / "copy.tar")
    assert fz.main([*TINY, "--features", str(tmp_path / "f2"), "--split", "train", "--num_workers", "0",
                    "--input_shards", f"{first} {tmp_path / 'copy.tar'}"]) == 1
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")][-1]
    assert "appears twice in the store" in line and "00000.tar#" in line and "copy.tar#" in line, line
    assert "two input shards hold this sample's key" in line


@pytest.mark.usefixtures("read_ahead")
def test_stalls_and_huge_members_are_errors_not_hangs(tmp_path):
    """Probe D2, D3, D8, each made here: a server that drips a byte every 0.05 s (a per-read timeout
    never fires), a `pipe:` command that writes nothing and never exits, and a tar member that
    claims 10 GB: each a StoreError naming the URL within a few timeouts, nothing read whole."""
    reply = ("c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 100000000\\r\\n\\r\\n')\n"
             "while True:\n    c.sendall(b'x'); time.sleep(0.05)\n")
    with one_reply_server(reply) as base:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"drip\.json: the transfer has stalled"):
            read_bytes(f"{base}/drip.json", timeout=1.0)
        assert time.monotonic() - t0 < 10
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"pipe:sleep 600: the command wrote nothing for 1 s"):
        list(tar_samples("pipe:sleep 600", timeout=1.0))
    assert time.monotonic() - t0 < 10
    huge = tmp_path / "huge.tar"
    header = tarfile.TarInfo("000000000.jpg")
    header.size = 10 << 30
    huge.write_bytes(header.tobuf(format=tarfile.PAX_FORMAT) + b"\xff\xd8" * 1000)
    with pytest.raises(StoreError, match=r"member 000000000\.jpg says it holds 10737418240 bytes"):
        list(tar_samples(str(huge)))


def test_the_streaming_benchmark_runs(capsys):
    """bench/stream on a few grids and Python's server: every path read, each ratio printed (no
    timing asserted)."""
    from bench import stream as bench_stream
    assert bench_stream.main(["--images", "8", "--rounds", "1", "--server", "python"]) == 0
    out = capsys.readouterr().out
    assert "8 grids of 14x14x2048 float16" in out and "in 1 tar shards" in out and "server: python -m http.server" in out
    for what in ("grids ", "images "):
        line = next(line for line in out.splitlines() if line.startswith(what))
        assert "local" in line and "http/local" in line and "other" in line
