"""Streaming reads over HTTP against reading the same shards from the local folder, in one run.

    python -m bench.stream                    # 1,024 COCO-size grids (14x14x2048) in 4 tar shards
    python -m bench.stream --images 256 --rounds 9  # 4 shards of 64
    python -m bench.stream --other receive_buffer   # 'other': the kernel's own receive buffer

The grid shards are the size featurize writes (256 grids, ~205 MB: `shard_images`,
`shard_bytes`), unless --shards says how many: a stream's start and end (a connection, the
receiving thread's first and last buffers) weigh more in smaller shards.

A real HTTP server process on 127.0.0.1 serves the folder, standing in for an object store:
nginx when it is installed (`apt install nginx`; started and stopped here with its own config,
sendfile on), else `python -m http.server` (`--server` chooses); the server alone is measured
too (a plain client reading each shard's body in 1 MiB reads, nothing parsed). Both paths read
every record through the same reader (`shards.wds.stream`: tar parsed, every grid's CRC-32C
checked), local files memory-mapped, HTTP streamed by `shards.remote`. Also the image-text input
shards' raw reads (tar members grouped by key, no decoding). Each round times every path,
local and HTTP back to back; printed: the best round's img/s, and the median (and range) of the
rounds' HTTP/local ratios. Loopback has no network limit:
the ratio is the cost of the HTTP path itself (server, sockets, stream parsing), an upper bound
on what a real network gives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from common.config import FeaturizeConfig
from common.machine import cores
from featurize.extract import shard_size
from shards import open_store, write_records
from shards.imagetext import write_image_text_shards
from shards import remote
from shards.remote import tar_samples
from shards.wds import stream


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NGINX_CONF = """
worker_processes 2;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


def start_server(kind: str, root: Path, port: int) -> tuple[subprocess.Popen, str]:
    """(process, its name): nginx with a config of its own, or Python's http.server."""
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") or Path("/usr/sbin/nginx").exists() else "python"
    if kind == "nginx":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        (root / "tmp").mkdir(exist_ok=True)
        root.chmod(0o755)  # its workers run as another user: the (temporary) folder must be readable
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=root, port=port))
        return subprocess.Popen([nginx, "-c", str(conf), "-p", str(root), "-e", str(root / "nginx-error.log"),
                                 "-g", "daemon off;"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), "nginx (2 workers, sendfile)"
    return subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), "python -m http.server"


def body_bytes(url: str) -> int:
    """A plain client: the body read in 1 MiB reads and dropped (the server's own rate)."""
    n = 0
    with urllib.request.urlopen(url, timeout=60) as r:
        while chunk := r.read(1 << 20):
            n += len(chunk)
    return n


def timed(fn) -> float:
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def paired(http: list[float], local: list[float]) -> str:
    """The median of each round's HTTP/local ratio, and their range: on a shared machine whose speed
    drifts, a ratio within a round says more than the best of each path."""
    ratios = sorted(h / lo for h, lo in zip(http, local))
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--shards", type=int, default=0, help="grid shards (0: of featurize's size, 256 COCO-size grids)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--server", default="auto", choices=("auto", "nginx", "python"))
    p.add_argument("--other", default="read_ahead", choices=("read_ahead", "receive_buffer"),
                   help="the setting the 'other' column changes: the receiving thread (remote.READ_AHEAD: on where "
                        "it is off, off where on) or the socket's receive buffer (left to the kernel)")
    a = p.parse_args(argv)
    if not a.shards:
        fcfg = FeaturizeConfig()
        a.shards = -(-a.images // shard_size(fcfg, "wds", 2048))
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        grid = lambda: np.maximum(rng.standard_normal((14, 14, 2048), dtype=np.float32), 0).astype(np.float16)  # noqa: E731
        recs = ({"key": f"k{i}", "image_id": i, "filename": "x", "captions": [["a", "shape"]], "features": grid()}
                for i in range(a.images))
        write_records(root / "feats", recs, backend="wds", num_records=a.images, grid=14, channels=2048,
                      shard_size=-(-a.images // a.shards))
        jpeg = bytes(rng.integers(0, 256, 50_000, dtype=np.uint8))  # ~50 kB, a typical img2dataset JPEG's size
        write_image_text_shards(((f"{i:09d}", {"jpg": jpeg, "txt": b"a shape"}) for i in range(a.images * 8)),
                                root / "in", a.images * 8 // a.shards)
        port = free_port()
        server, server_name = start_server(a.server, root, port)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    urllib.request.urlopen(base + "/", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            store = open_store(root / "feats")
            local = store.urls()
            http = [f"{base}/feats/{Path(u).name}" for u in local]
            ins = sorted(str(f) for f in (root / "in").glob("*.tar"))
            ins_http = [f"{base}/in/{Path(u).name}" for u in ins]
            feats = lambda urls: sum(1 for _ in stream(urls, grid=14, channels=2048, require_checksum=True))  # noqa: E731
            raw = lambda urls: sum(1 for u in urls for _ in tar_samples(u))  # noqa: E731
            rates: dict[str, list[float]] = {k: [] for k in (
                "grids local", "grids http", "images local", "images http", "server alone", "grids http other",
                "images http other")}
            records_per_byte = a.images / sum(body_bytes(u) for u in http)
            setting = {"read_ahead": "READ_AHEAD", "receive_buffer": "RECEIVE_BUFFER"}[a.other]
            default = getattr(remote, setting)
            other_value = (not default) if a.other == "read_ahead" else 0
            for _ in range(a.rounds):  # each round times every path once, local and HTTP back to back
                rates["server alone"].append(timed(lambda: sum(body_bytes(u) for u in http) * records_per_byte))
                rates["grids local"].append(timed(lambda: feats(local)))
                rates["grids http"].append(timed(lambda: feats(http)))
                rates["images local"].append(timed(lambda: raw(ins)))
                rates["images http"].append(timed(lambda: raw(ins_http)))
                setattr(remote, setting, other_value)  # the other setting, in the same rounds
                try:
                    rates["grids http other"].append(timed(lambda: feats(http)))
                    rates["images http other"].append(timed(lambda: raw(ins_http)))
                finally:
                    setattr(remote, setting, default)
        finally:
            server.terminate()
            server.wait()
    mb = 14 * 14 * 2048 * 2 / 1e6
    print(f"{a.images} grids of 14x14x2048 float16 ({mb:.2f} MB each) in {a.shards} tar shards; "
          f"{a.images * 8} 50 kB images in {a.shards} input shards; {a.rounds} rounds; server: {server_name}; "
          f"{cores()} cores, load {load:.2f} before")
    if a.other == "read_ahead":
        on_off = lambda on: "received by a thread" if on else "received on the reading thread"  # noqa: E731
        print(f"http: {on_off(default)} (this machine's default); 'other': {on_off(not default)}")
    else:
        print(f"http: receive buffer {default >> 20} MiB asked (this machine's default: "
              f"{'used' if min(default, remote._system_receive_limit()) >= 1 << 20 else 'not allowed, kernel-sized'}); "
              "'other': kernel-sized (SHARDS_RECEIVE_BUFFER=0)")
    print("ratios: HTTP over local in the same round, the median of the rounds (lowest-highest); "
          "rates: the best round")
    s = max(rates["server alone"])
    print(f"server  alone (a plain client, nothing parsed): {s:9,.0f} grids/s ({s * mb:6,.0f} MB/s)")
    for what, size in (("grids", mb), ("images", 0.05)):
        lo, hi = max(rates[f"{what} local"]), max(rates[f"{what} http"])
        ratio = paired(rates[f"{what} http"], rates[f"{what} local"])
        other = paired(rates[f"{what} http other"], rates[f"{what} local"])
        print(f"{what:6s}  local {lo:9,.0f} img/s ({lo * size:6,.0f} MB/s)   http {hi:9,.0f} img/s "
              f"({hi * size:6,.0f} MB/s)   http/local {ratio}   other {other}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
