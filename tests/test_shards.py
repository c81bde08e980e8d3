import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from shards import StoreError, done_shards, finalize, open_store, write_records
from shards.__main__ import convert, main as shards_main, stats, verify
import shards.format as fmt
from tests.conftest import read_tars, same_record

ROOT = Path(__file__).resolve().parent.parent
C = 32


def npy_bytes(x):
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def make_records(n, seed=0, channels=C):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = np.maximum(rng.standard_normal((14, 14, channels)) * 3, 0).astype(np.float16)
        x[0, 0, :4] = [np.float16(6e-8), np.float16(-0.0), np.float16(65504), np.float16(1 / 3)]  # subnormal, -0, max
        out.append({"key": f"rec_{i:05d}", "image_id": 1000 + i, "filename": f"images/{i}.jpg", "features": x,
                    "captions": [["a", "red", "circle"], ["word"] * (i % 4 + 1)]})
    return out


def write(root, records, backend, shard_size=4, **kw):
    return write_records(root, iter(records), backend=backend, num_records=len(records), grid=14, channels=C,
                         shard_size=shard_size, info={"backbone": "test"}, **kw)


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_round_trip_bit_exact(tmp_path, backend):
    recs = make_records(11)
    m = write(tmp_path / "s", recs, backend)
    assert m["count"] == 11 and m["num_shards"] == 3 and all(len(s["sha256"]) == 64 for s in m["shards"])
    store = open_store(tmp_path / "s")
    back = list(store.iter_records())
    assert len(back) == 11 and all(same_record(a, b) for a, b in zip(recs, back))
    assert back[0]["features"].dtype == np.float16 and back[0]["features"].shape == (14, 14, C)
    if backend == "zarr":
        assert same_record(store[7], recs[7])
    assert verify(tmp_path / "s", progress=False) == []


def test_conversion_is_lossless(tmp_path):
    recs = make_records(9)
    write(tmp_path / "z", recs, "zarr")
    convert(tmp_path / "z", tmp_path / "w", "wds", shard_size=2)
    convert(tmp_path / "w", tmp_path / "z2", "zarr", shard_size=5)
    for path in ("w", "z2"):
        assert all(same_record(a, b) for a, b in zip(recs, open_store(tmp_path / path).iter_records()))
    assert shards_main(["convert", str(tmp_path / "z"), str(tmp_path / "w3"), "--format", "wds"]) == 0


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_shards import make_records, write
rank, world, backend, slow = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def slowly(records):
    for r in records:
        time.sleep(slow)
        yield r
from shards import write_records
write_records(sys.argv[5], slowly(make_records(20)), backend=backend, num_records=20, grid=14, channels=32,
              shard_size=4, info={{"backbone": "test"}}, rank=rank, world_size=world)
"""


def run_writer(tmp_path, rank, world, backend, slow, root):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    return subprocess.Popen([sys.executable, str(script), str(rank), str(world), backend, str(slow), str(root)])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_two_writers_merge(tmp_path, backend):
    root = tmp_path / "s"
    procs = [run_writer(tmp_path, r, 2, backend, 0.0, root) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    m = finalize(root, "train")
    assert m["count"] == 20 and verify(root, progress=False) == []
    assert all(same_record(a, b) for a, b in zip(make_records(20), open_store(root).iter_records()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_killed_writer_resumes(tmp_path, backend):
    root = tmp_path / "s"
    p = run_writer(tmp_path, 0, 1, backend, 0.15, root)
    for _ in range(1200):  # two shards done, the third in progress
        if (root / "shards" / "000001.json").exists():
            break
        assert p.poll() is None, "the writer ended before it could be killed"
        time.sleep(0.05)
    else:
        pytest.fail("the writer did not finish two shards")
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    problems = verify(root, progress=False)
    assert problems and "no manifest" in problems[0] and "of 5 shards finished" in problems[1]
    with pytest.raises(StoreError, match="writer has not finished"):
        open_store(root)
    p = run_writer(tmp_path, 0, 1, backend, 0.0, root)
    assert p.wait(timeout=120) == 0
    assert verify(root, progress=False) == []
    back = list(open_store(root).iter_records())
    assert len(back) == 20 and all(same_record(a, b) for a, b in zip(make_records(20), back))
    assert not list(root.glob(".*.tmp"))


def tar_with(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_pickle_member_is_refused(tmp_path):
    rec = make_records(1)[0]
    tar_with(tmp_path / "evil.tar", [("rec_00000.features.npy", npy_bytes(rec["features"])),
                                     ("rec_00000.json", json.dumps(fmt.meta(rec)).encode()),
                                     ("rec_00000.pyd", b"\x80\x04K\x01.")])
    with pytest.raises(StoreError, match=r"evil.tar: rec_00000: refusing member\(s\) .pyd"):
        read_tars([str(tmp_path / "evil.tar")], grid=14)
    # an object-dtype .npy (which would need unpickling) is refused too
    buf = io.BytesIO()  # an object-dtype .npy: loading it would need unpickling its payload
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    buf.write(b"\x80\x04K\x01.")
    tar_with(tmp_path / "obj.tar", [("k.features.npy", buf.getvalue()), ("k.json", b'{"key": "k"}')])
    with pytest.raises(StoreError, match="not a plain .npy"):
        read_tars([str(tmp_path / "obj.tar")])


def test_torn_tar_is_an_error(tmp_path):
    write(tmp_path / "s", make_records(8), "wds", shard_size=8)
    tar = tmp_path / "s" / "shard-000000.tar"
    data = tar.read_bytes()
    (tmp_path / "torn.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(StoreError, match="torn.tar|unreadable shard"):
        read_tars([str(tmp_path / "torn.tar")], grid=14)
    with tarfile.open(tar) as t:  # cut exactly at a member's header: tarfile alone would just stop there
        cut = t.getmembers()[6].offset
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    with pytest.raises(StoreError, match="cut.tar: torn shard"):
        read_tars([str(tmp_path / "cut.tar")], grid=14)
    assert len(read_tars([f"pipe:cat {tar}"], grid=14)) == 8  # the same shard through webdataset's reader


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_corrupted_byte(tmp_path, backend):
    write(tmp_path / "s", make_records(8), backend, shard_size=8)
    store = open_store(tmp_path / "s")
    _, f = store.shard_files()[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0xFF
    f.write_bytes(bytes(data))
    problems = verify(tmp_path / "s", progress=False)
    assert len(problems) == 1 and "checksum mismatch" in problems[0] and str(f) in problems[0]
    assert shards_main(["verify", str(tmp_path / "s")]) == 1
    if backend == "zarr":  # crc32c per chunk: even without verify, reading fails loudly
        with pytest.raises(StoreError, match="corrupted data"):
            list(open_store(tmp_path / "s").iter_records())


def test_bad_records_are_refused(tmp_path):
    good = make_records(1)[0]
    bad = [
        ({**good, "features": good["features"].astype(np.float32)}, "dtype float32"),
        ({**good, "features": good["features"][:7]}, r"shape \(7, 14, 32\)"),
        ({**good, "features": np.full((14, 14, C), np.nan, np.float16)}, "NaN or inf"),
        ({**good, "key": "a.b"}, "bad key"),
    ]
    for rec, msg in bad:
        with pytest.raises(fmt.RecordError, match=msg):
            fmt.validate(rec, 14, C, where="x")


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_threaded_writes_stop_on_a_bad_record_and_resume(tmp_path, backend):
    """Shards are written by several threads; a bad record fails its shard with the key named,
    the other shards stay whole, and a rerun with good records completes the store exactly."""
    recs = make_records(20)
    bad = [dict(r) for r in recs]
    bad[9] = {**bad[9], "features": np.full((14, 14, C), np.inf, np.float16)}  # shard 2 of 5
    with pytest.raises(fmt.RecordError, match="rec_00009.*NaN or inf"):
        write(tmp_path / "s", bad, backend, threads=3)
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert 2 not in done_shards(tmp_path / "s")
    m = write(tmp_path / "s", recs, backend, threads=3)
    assert m["count"] == 20 and m["num_shards"] == 5
    back = list(open_store(tmp_path / "s").iter_records())
    assert len(back) == 20 and all(same_record(a, b) for a, b in zip(recs, back))
    assert verify(tmp_path / "s", progress=False) == []


def test_pipe_urls_and_stats(tmp_path, capsys):
    recs = make_records(6)
    write(tmp_path / "s", recs, "wds", shard_size=3)
    urls = [f"pipe:cat {tmp_path / 's' / f'shard-{k:06d}.tar'}" for k in range(2)]
    assert all(same_record(a, b) for a, b in zip(recs, read_tars(urls, grid=14)))
    s = stats(tmp_path / "s")
    assert s["count"] == 6 and 0.4 < s["zero_fraction"] < 0.6
    assert shards_main(["stats", str(tmp_path / "s")]) == 0
    assert "compression_ratio" in capsys.readouterr().out


def test_missing_manifest_message(tmp_path):
    with pytest.raises(StoreError, match="no such features folder"):
        open_store(tmp_path / "nothing")


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["shards"].reverse(), "shard entry 0 is not shard 0"),
    (lambda m: m["shards"][1].update(index=5), "shard entry 1 is not shard 1"),
    (lambda m: m["shards"].__setitem__(2, [2, 4]), "shard entry 2 is not shard 2"),
    (lambda m: m["shards"][1].update(count=True), "shard 1 has count True, not 0..4"),
    (lambda m: m["shards"][1].update(count=-1), "shard 1 has count -1, not 0..4"),
    (lambda m: m["shards"][1].update(count=5), "shard 1 has count 5, not 0..4"),
    (lambda m: m["shards"][1].update(count=2.0), "shard 1 has count 2.0, not 0..4"),
    (lambda m: m["shards"][1].pop("count"), "shard 1 has count None, not 0..4"),
    (lambda m: m["shards"][1].update(count=3), "count 10, the shards hold 9 records"),
])
def test_an_edited_shard_list_is_refused_at_opening(tmp_path, edit, says):
    """Opening checks the manifest's shard list (in order, each count an integer within the shard
    size, the counts adding up) and names the manifest and the entry."""
    write(tmp_path / "s", make_records(10), "zarr")
    path = tmp_path / "s" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(StoreError, match=re.escape(f"{path}: {says}")):
        open_store(tmp_path / "s")


@pytest.mark.parametrize("codec", ["zstd", "none", "blosc-zstd"])
def test_zarr_reads_our_shards_and_we_read_zarrs(tmp_path, codec):
    """Shard files encoded here are zarr v3 sharding bytes: zarr-python reads them, and we read zarr's."""
    import zarr
    from shards.zarr_store import decode_shard
    recs = make_records(11)
    write(tmp_path / "s", recs, "zarr", shard_size=4, codec=codec)
    arr = zarr.open_array(tmp_path / "s" / "features.zarr", mode="r")[:]  # zarr's own reader
    assert arr.dtype == np.float16 and all(arr[i].tobytes() == r["features"].tobytes() for i, r in enumerate(recs))
    store = open_store(tmp_path / "s")
    assert all(same_record(store[i], r) for i, r in enumerate(recs))  # random access
    if codec in ("zstd", "blosc-zstd"):  # a shard written by zarr itself, decoded here
        z = zarr.open_array(tmp_path / "s" / "features.zarr", mode="r+")
        z[4:8] = np.stack([r["features"] for r in recs[:4]])
        data = (tmp_path / "s" / "features.zarr" / "c" / "1" / "0" / "0" / "0").read_bytes()
        got = decode_shard(data, 4, 4, codec, (14, 14, C), "x")
        assert all(got[i].tobytes() == recs[i]["features"].tobytes() for i in range(4))


def test_tar_shards_are_tarfiles_bytes(tmp_path):
    """Tar members are written from buffers without joining them: the same bytes `tarfile` and `np.save`
    write; each .json carries the CRC-32C of the grid's bytes (np.save's payload after its header)."""
    import crc32c
    recs = make_records(6)
    m = write(tmp_path / "w", recs, "wds", shard_size=4)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for r in recs[:4]:
            npy = npy_bytes(r["features"])
            crc = crc32c.crc32c(npy[-r["features"].nbytes:])
            for name, data in ((f"{r['key']}.features.npy", npy),
                               (f"{r['key']}.json", json.dumps({**fmt.meta(r), "crc32c": crc}).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    data = (tmp_path / "w" / m["shards"][0]["file"]).read_bytes()
    assert data == ref.getvalue()
    assert m["shards"][0]["sha256"] == hashlib.sha256(data).hexdigest() and m["shards"][0]["bytes"] == len(data)


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_write_block_matches_write_shard(tmp_path, backend):
    """featurize's path (a shard's grids in one block, failed rows zero) gives the same files as records."""
    from shards import create_writer, make_plan
    recs = make_records(8)
    plan = make_plan(backend, 8, 4, 14, C, {}, "blosc-zstd" if backend == "zarr" else "")
    a, b = create_writer(tmp_path / "a", plan), create_writer(tmp_path / "b", plan)
    fail = [{"filename": recs[5]["filename"], "reason": "truncated"}]
    for k in range(2):
        rows = [i for i in range(4 * k, 4 * k + 4) if i != 5]
        a.write_shard(k, [(i, recs[i]) for i in rows], fail if k else [])
        block = np.stack([recs[i]["features"] if i != 5 else np.zeros_like(recs[i]["features"]) for i in range(4 * k, 4 * k + 4)])
        b.write_block(k, block, [{"row": i, **fmt.meta(recs[i])} for i in rows], fail if k else [])
    ma, mb = finalize(tmp_path / "a"), finalize(tmp_path / "b")
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]] and mb["failures"] == fail
    assert [r["key"] for r in open_store(tmp_path / "b").iter_records()] == [r["key"] for i, r in enumerate(recs) if i != 5]
    bad = np.stack([recs[i]["features"] for i in range(4)])
    bad[2, 3, 4, 5] = np.inf
    with pytest.raises(fmt.RecordError, match=f"record {recs[2]['key']}: features hold NaN or inf"):
        b.write_block(0, bad, [{"row": i, **fmt.meta(recs[i])} for i in range(4)])


def test_finalize_removes_temporary_files_of_killed_writers(tmp_path):
    recs = make_records(4)
    write(tmp_path / "s", recs, "zarr")
    stray = tmp_path / "s" / "features.zarr" / "c" / ".0.12345.678.tmp"
    stray.write_bytes(b"half a shard")
    finalize(tmp_path / "s")
    assert not stray.exists() and verify(tmp_path / "s", progress=False) == []


def test_finite_on_every_float16():
    """The bit-level finiteness check agrees with np.isfinite on all 65,536 float16 values, alone and in arrays."""
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):
        want = np.isfinite(every)
    assert [fmt.finite(every[i:i + 1]) for i in range(65536)] == want.tolist()
    grid = np.zeros((14, 14, 8), dtype=np.float16)
    assert fmt.finite(grid) and fmt.finite(grid[:0])
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        g = grid.copy()
        g[3, 4, 5] = bad
        assert not fmt.finite(g) and not fmt.finite(g[1::2]) and fmt.finite(g[::2])  # strided views too


def test_load_npy_matches_np_load_and_refuses_pickles():
    from shards.wds import load_npy
    rng = np.random.default_rng(0)
    for x in (rng.standard_normal((14, 14, 8)).astype(np.float16), np.asfortranarray(rng.standard_normal((3, 5))),
              np.arange(7, dtype=">i4"), np.zeros((0, 4), dtype=np.float16)):
        for version in ((1, 0), (2, 0)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, x, version=version)
            got = load_npy(memoryview(buf.getvalue()))
            assert got.dtype == x.dtype and got.shape == x.shape and np.array_equal(got, x) and got.flags.writeable
    buf = io.BytesIO()  # an object array's .npy: its header, then pickle opcodes (written as bytes, never pickled)
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    with pytest.raises(ValueError, match="object arrays need pickle"):
        load_npy(buf.getvalue() + b"\x80\x04K\x01.")
    data = npy_bytes(np.ones((4, 4), dtype=np.float16))
    with pytest.raises(ValueError, match="data bytes for shape"):
        load_npy(data[:-2])
    with pytest.raises(ValueError, match="magic"):
        load_npy(b"PK\x03\x04" + data)


def test_writer_threads_share_the_cores(monkeypatch):
    from shards import writer_threads
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert writer_threads(3) == 3 and writer_threads() == max(1, min(16, cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes than cores: one each
    assert writer_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GPU processes on 64 cores
    assert writer_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert writer_threads() == 16


def test_a_folder_of_another_run_says_whether_anything_in_it_is_usable(tmp_path):
    """A featurize run stopped before its first shard (a bad brace range, a typo) and run again with
    other inputs: the error says nothing there is usable and how to start over; once a shard is
    done, the folder is another run's work and the error says so."""
    from shards.manifest import ensure_plan, make_plan
    a = make_plan("zarr", 8, 4, 14, C, {"input_shards": "x/{00000..00009}.tar"}, "blosc-zstd")
    b = make_plan("zarr", 16, 4, 14, C, {"input_shards": "x/{00000..00019}.tar"}, "blosc-zstd")
    ensure_plan(tmp_path / "s", a)
    with pytest.raises(StoreError, match=r"wrote nothing usable \(differs in info, num_records, num_shards\); delete "
                                         r"the folder \(rm -r .*/s\) and run again"):
        ensure_plan(tmp_path / "s", b)
    write(tmp_path / "t", make_records(8), "zarr")
    with pytest.raises(StoreError, match="holds a different run"):
        ensure_plan(tmp_path / "t", b)


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_opening_a_store_reads_no_record_metadata(tmp_path, backend, monkeypatch):
    """Opening a store costs its shard list, not its records: no shard JSON is read until a record
    is asked for, then only that shard's; a pass over all records holds a few shards at a time and
    gives the same records as before."""
    import shards.manifest as manifest
    records = make_records(24)
    write(tmp_path / "s", records, backend, shard_size=4)
    read = []
    real = manifest.read_json
    monkeypatch.setattr(manifest, "read_json", lambda path, what: read.append(Path(path).name) or real(path, what))
    store = open_store(tmp_path / "s")
    assert len(store) == 24 and read == ["manifest.json"]
    read.clear()
    if backend == "zarr":
        assert same_record(store[13], records[13]) and read == ["000003.json"]
    assert store.records[13]["key"] == "rec_00013" and store.shard_of(13) == 3
    assert all(same_record(a, b) for a, b in zip(store, records))
    assert len(store.records._held) <= store.records._keep
    assert [r["key"] for r in store.records[5:10]] == [f"rec_{i:05d}" for i in range(5, 10)]


def test_a_shard_json_edited_after_opening_is_checked_when_read(tmp_path):
    """The per-shard checks run when a shard's records are first read: a record whose row lies
    outside its shard is an error naming the shard JSON, at the read that reaches it."""
    write(tmp_path / "s", make_records(8), "zarr", shard_size=4)
    path = tmp_path / "s" / "shards" / "000001.json"
    meta = json.loads(path.read_text())
    meta["records"][0]["row"] = 0
    path.write_text(json.dumps(meta))
    store = open_store(tmp_path / "s")
    assert store.records[0]["key"] == "rec_00000"
    with pytest.raises(StoreError, match="000001.json: record 'rec_00004' has row 0, outside shard 1"):
        store.records[4]


@pytest.mark.usefixtures("read_ahead")
@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_streamed_tars_read_as_tarfile_reads_them(tmp_path, form):
    """The streamed reader (its own header parser, each member read straight into its buffer)
    gives the members tarfile gives: long and non-ASCII names (PAX and GNU headers), a directory
    and a link skipped, an empty member, sizes around the 512-byte blocks."""
    from shards.remote import tar_members
    path = tmp_path / "t.tar"
    rng = np.random.default_rng(0)
    long = "d/" + "x" * 120 + ".jpg" if form != tarfile.USTAR_FORMAT else "d/" + "x" * 90 + ".jpg"
    names = [long, "d/café.txt" if form != tarfile.USTAR_FORMAT else "d/cafe.txt", "d/empty.json", "d/k1.bin", "d/k2.bin"]
    sizes = [700, 13, 0, 512, 1025]
    with tarfile.open(path, "w", format=form) as tar:
        tar.addfile(tarfile.TarInfo("d"))  # a regular entry of size 0 named like a folder
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, size in zip(names, sizes):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(rng.bytes(size)))
        link = tarfile.TarInfo("d/link")
        link.type, link.linkname = tarfile.SYMTYPE, "k1.bin"
        tar.addfile(link)
    with tarfile.open(path) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    got = [(m["fname"], bytes(m["data"])) for m in tar_members(f"pipe:cat {path}")]
    assert got == want and len(got) == 6


def test_tar_header_reads_every_header_as_tarfile_does():
    """The tar header parser (of streamed and mapped shards alike) gives tarfile's (name, size,
    type) for the headers tarfile writes in each format (long, prefixed, non-ASCII names; PAX and
    GNU headers; a V7 directory; sizes past what 11 octal digits hold; every member type) and for
    a checksum made with signed bytes; a header with a bit flipped is refused as tarfile refuses it."""
    from shards.remote import tar_header
    rng = np.random.default_rng(0)
    names = ["k1.features.npy", "d/" + "x" * 90 + ".jpg", "a/" * 60 + "b.txt", "café/é.json", "v7dir/", ""]
    kinds = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
    seen = 0
    for form in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for name in names:
            for kind in kinds:
                for size in (0, 1, 511, 512, 802_944, 8 << 30 if form != tarfile.USTAR_FORMAT else 7 << 30):
                    info = tarfile.TarInfo(name)
                    info.type, info.size = kind, size
                    try:
                        buf = info.tobuf(form, "utf-8", "surrogateescape")
                    except ValueError:  # a name or size this format cannot hold
                        continue
                    blocks = [buf[i:i + 512] for i in range(0, len(buf), 512)]
                    for block in (blocks[0], blocks[-1]):  # an extended header (if any) and the member's own
                        want = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                        assert tar_header(block) == (want.name, want.size, want.type), (form, name, kind, size)
                        seen += 1
                    bad = bytearray(blocks[-1])
                    at = int(rng.integers(0, 512))
                    bad[at] ^= 1 << int(rng.integers(0, 8))
                    try:
                        want = tarfile.TarInfo.frombuf(bytes(bad), "utf-8", "surrogateescape")
                    except tarfile.TarError:
                        with pytest.raises(tarfile.TarError):
                            tar_header(bytes(bad))
                    else:  # a change tarfile accepts (an unused byte whose checksum still agrees): read alike
                        assert tar_header(bytes(bad)) == (want.name, want.size, want.type)
    assert seen > 300
    signed = bytearray(tarfile.TarInfo("é" * 20).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    signed[148:156] = b" " * 8
    total = sum(b - 256 if b > 127 else b for b in signed)  # as Sun's and NeXT's tars summed
    signed[148:156] = b"%06o\0 " % total
    assert tar_header(bytes(signed)) == ("é" * 20, 0, tarfile.REGTYPE)


@pytest.mark.usefixtures("read_ahead")
def test_a_streamed_member_of_any_type_claiming_too_much_is_refused(tmp_path):
    """A non-regular member (here a character device) whose header claims 10 GB is refused before
    anything is allocated for it, as a regular one is."""
    from shards.remote import tar_members
    path = tmp_path / "t.tar"
    info = tarfile.TarInfo("k.bin")
    info.type, info.size = tarfile.CHRTYPE, 10 << 30
    path.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(StoreError, match="says it holds 10737418240 bytes"):
        list(tar_members(f"pipe:cat {path}"))
