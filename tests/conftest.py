"""Shared fixtures: a tiny shapes world, featurized once per session (CPU, random weights)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A 120-image shapes world at 64 px (96 train, 12 val, 12 test)."""
    from featurize.synthetic import generate
    out = tmp_path_factory.mktemp("shapes")
    generate(out, num_images=120, seed=3, image_size=64, progress=False)
    return out


def same_record(a: dict, b: dict) -> bool:
    """Bit-exact equality of two feature-store records: metadata, dtype, shape and bytes."""
    from shards.format import meta
    return (meta(a) == meta(b) and a["features"].dtype == b["features"].dtype
            and a["features"].shape == b["features"].shape and a["features"].tobytes() == b["features"].tobytes())


def read_tars(urls, grid: int | None = None, channels: int | None = None) -> list:
    """Records of tar shards in order (paths, `pipe:` URLs), without a manifest."""
    from shards.wds import stream
    return list(stream(list(urls), grid=grid, channels=channels))


def free_port() -> str:
    """A TCP port free on this machine now, for a two-process rendezvous (no fixed ports that
    another test or program may hold)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(params=[False, True], ids=["inline", "read-ahead"])
def read_ahead(request, monkeypatch) -> bool:
    """Streamed tars received on the consumer's thread, then by a thread of their own (the default
    wherever a process has more than one core): a test using this runs both ways."""
    import shards.remote as remote
    monkeypatch.setattr(remote, "READ_AHEAD", request.param)
    return request.param


@pytest.fixture
def copy_backbone():
    """`copy_backbone(src, dst)`: put the calibrated random backbone of features folder `src`
    (backbone.safetensors + backbone.json) into `dst`, so featurizing into `dst` makes the same
    grids without calibrating again."""
    import shutil

    def copy(src: Path, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("backbone.safetensors", "backbone.json"):
            shutil.copy(Path(src) / f, dst / f)
        return dst
    return copy


def tiny_args(shapes: Path, features: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--input_json", str(shapes / "dataset.json"),
            "--features", str(features), *extra]


@pytest.fixture(scope="session")
def tiny_features(shapes, tmp_path_factory) -> Path:
    """zarr features of every split of the tiny world (resnet18 layer3, random weights, 64 px)."""
    import featurize.__main__ as fz
    out = tmp_path_factory.mktemp("features")
    assert fz.main(tiny_args(shapes, out, "--split", "all")) == 0
    return out


@pytest.fixture(scope="session")
def trained_run(shapes, tiny_features, tmp_path_factory) -> Path:
    """A decoder trained 4 epochs on the tiny world's cached grids (its users add eval folders, nothing else)."""
    from caption import train
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--max_epochs", "4",
                                "--learning_rate", "5e-3", "--batch_size", "8")) == 0
    return run


@pytest.fixture
def run_torchrun():
    """`run_torchrun(*args, nproc=2, timeout=600)`: torchrun on this machine (gloo, one thread per
    process) running `args` (a script or `-m module`, then its flags) from the repository root;
    the CompletedProcess, its stdout + stderr also in `.out`. Tests that use it are `slow`."""
    import subprocess

    def run(*args, nproc: int = 2, timeout: int = 600, port: str | None = None) -> subprocess.CompletedProcess:
        torchrun = Path(sys.executable).parent / "torchrun"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        r = subprocess.run([str(torchrun), "--nproc_per_node", str(nproc), "--master_port", port or free_port(),
                            *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        r.out = r.stdout + r.stderr
        return r
    return run


def pytest_collection_modifyitems(items):
    """Tests that start processes through `run_torchrun` are slow (`pytest -m "not slow"` skips them)."""
    for item in items:
        if "run_torchrun" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
