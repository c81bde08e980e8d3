"""The train split held in memory for the whole run: loaded once, as float16, into (pinned) RAM
or the GPU; every epoch after the first then costs only compute.

    train.features_in_memory: off | ram | device | auto     (configs: the `train` section)
    train.memory_budget_gb:   what it may take (0: 80% of the RAM available, 90% of the GPU's free memory)

Every process holds the whole split and takes its batches with the streaming path's sampler
(`caption.data.EpochBatches`: one (seed, epoch) permutation dealt to the processes), so the
batches are the streamed ones bit for bit and N processes follow one process's trajectory. In
RAM the processes of one machine share one copy: the machine's first process loads it into a
file in shared memory (/dev/shm), the others map it, and the file's name is removed once every
process has it mapped (nothing is left behind). On the GPU each process holds its own copy. The
budget is checked before anything is loaded, and every process acts on the same choice: an
explicit `ram`/`device` that does not fit (on any process) is an error saying so, `auto` falls
back (device, then RAM, then streaming) and says what it chose.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from caption.data import EpochBatches, collate_captions, pick_captions
from caption.vocab import Vocab
from common.errors import UserError
from shards.ahead import ReadAhead

MODES = ("off", "ram", "device", "auto")
WHERE = ("off", "ram", "device")  # where features can be, in the order processes agree on (the least wins)


class MemoryBudgetError(UserError):
    """The features asked to be resident do not fit the stated memory budget."""


SHM = Path("/dev/shm")


def available_bytes(where: str, device: torch.device) -> int:
    """What `where` has free now: RAM the kernel says is available, or the GPU's free memory."""
    if where == "device":
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()}
        return info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def shm_free() -> int:
    """Bytes free in /dev/shm (0 where there is none); containers often give it 64 MB."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def budget(where: str, device: torch.device, budget_gb: float, shared: bool = False) -> int:
    """Bytes `where` may hold: the stated budget, or 80% of available RAM / 90% of free GPU memory;
    for RAM `shared` among a machine's processes, at most what /dev/shm has free."""
    have = int(budget_gb * 1e9) if budget_gb > 0 else int(available_bytes(where, device) * (0.9 if where == "device" else 0.8))
    return min(have, shm_free()) if where == "ram" and shared else have


def choose(mode: str, need: int, device: torch.device, budget_gb: float = 0.0, shared: bool = False) -> tuple[str, str]:
    """(where: off|ram|device, why) for `need` bytes; an explicit mode that cannot hold them is an
    error. `shared`: RAM is one copy in /dev/shm for the machine's processes."""
    gb = need / 1e9
    if mode == "off":
        return "off", "features_in_memory off: streaming from the store"
    if mode == "device" and device.type != "cuda":
        raise MemoryBudgetError("--features_in_memory device: no GPU here; use ram, auto or off")
    if mode in ("ram", "device"):
        have = budget(mode, device, budget_gb, shared)
        if need > have:
            shm = (f"; /dev/shm, where this machine's processes share them, has {shm_free() / 1e9:.2f} GB free "
                   "(a container: --shm-size)") if mode == "ram" and shared else ""
            raise MemoryBudgetError(f"--features_in_memory {mode}: the train features need {gb:.2f} GB, the budget is "
                                    f"{have / 1e9:.2f} GB (--memory_budget_gb; 0: what is free now){shm}; stream them "
                                    "(off), or give a larger budget")
        return mode, f"{gb:.2f} GB of features in {mode} (budget {have / 1e9:.2f} GB)"
    tried = []
    for where in (("device", "ram") if device.type == "cuda" else ("ram",)):
        have = budget(where, device, budget_gb, shared)
        if need <= have:
            return where, f"auto: {gb:.2f} GB of features in {where} (budget {have / 1e9:.2f} GB)"
        tried.append(f"{where} {have / 1e9:.2f} GB")
    return "off", f"auto: {gb:.2f} GB of features do not fit ({', '.join(tried)}): streaming from the store"


def shared_path(run: Path) -> Path:
    """The /dev/shm file a machine's processes share for this run (the same name on each of them)."""
    digest = hashlib.sha256(str(Path(run).resolve()).encode()).hexdigest()[:16]
    return SHM / f"image-caption-attention-{digest}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.f16"


class ResidentFeatures:
    """A feature store's records as one (n, L, D) float16 tensor in RAM (pinned when a GPU will read
    it), in a shared-memory file one machine's processes map, or on `device`; with each record's
    captions and id. `batch` gathers by index."""

    def __init__(self, store, where: str, device: torch.device, progress: bool = True,
                 shared: tuple[Path, bool, Callable[[], None]] | None = None):
        """`store`: an opened feature store (caption/splits.py). `shared` (RAM on several processes
        of a machine): (file, whether this process loads it, a barrier every process calls)."""
        g, c = store.manifest["grid"], store.manifest["channels"]
        n = len(store.records)
        self.where = where
        self.records = [{k: r[k] for k in ("key", "image_id", "captions")} for r in store.records]
        shape = (n, g * g, c)  # (n, L, D)
        if shared is None:
            host = torch.empty(shape, dtype=torch.float16, pin_memory=where == "ram" and device.type == "cuda")
            self._fill(store, host, progress)
        else:
            path, first, barrier = shared
            if first:  # the machine's first process loads the file; the others wait, then map it
                data = np.memmap(path, dtype=np.float16, mode="w+", shape=shape)
                try:
                    self._fill(store, torch.from_numpy(data), progress)
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
            barrier()
            if not first:
                data = np.memmap(path, dtype=np.float16, mode="r+", shape=shape)
            barrier()
            if first:
                path.unlink(missing_ok=True)  # mapped everywhere: the memory lives until the last process ends
            host = torch.from_numpy(data)
        self.features = host.to(device) if where == "device" else host
        self.device = self.features.device
        self.target = device  # where the batches are used

    @staticmethod
    def _fill(store, host: torch.Tensor, progress: bool) -> None:
        n, L, D = host.shape
        bar = tqdm(total=n, desc="features into memory", unit="img", disable=not progress)
        for i, rec in enumerate(store.iter_records()):
            host[i] = torch.from_numpy(rec["features"].reshape(L, D))  # (g, g, D) -> (L, D)
            bar.update(1)
        bar.close()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def batch(self, indices: list[int], vocab: Vocab, seq_per_img: int, max_length: int, seed: int, epoch: int) -> dict:
        """The batch `caption.data` would collate for these store indices, bit for bit: the same
        captions per (seed, epoch, image), the grids gathered from memory."""
        items = []
        for i in indices:
            r = self.records[i]
            rng = np.random.default_rng([seed, epoch, i])  # as CaptionedFeatures: fixed per (seed, epoch, image)
            caps = [vocab.encode(c, max_length) for c in pick_captions(r["captions"], seq_per_img, rng)]
            items.append({"captions": caps, "image_id": int(r["image_id"]), "refs": r["captions"], "key": r["key"],
                          "index": i})
        rows = torch.tensor(indices, device=self.device)
        n, L, D = len(indices), *self.features.shape[1:]
        # pinned features gathered into pinned memory, so that the copy to the GPU is asynchronous
        out = torch.empty((n, L, D), dtype=self.features.dtype, pin_memory=True) if self.features.is_pinned() else None
        return {"features": torch.index_select(self.features, 0, rows, out=out), **collate_captions(items, vocab)}  # (B, L, D)


def batches_ahead(device: torch.device) -> int:
    """Batches made ahead in a thread when training on `device`: 2 on a GPU, whose step is shorter
    than making a batch on the main thread (an H200 waited 33-40% of the time for them); none on
    a CPU, where the thread takes the cores the step uses (bench/RESULTS.md)."""
    return 2 if device.type == "cuda" else 0


def resident_batches(resident: ResidentFeatures, vocab: Vocab, *, batch_size: int, seq_per_img: int, max_length: int,
                     seed: int, epoch: int, start: int = 0, rank: int = 0, world: int = 1, ahead: int = 0):
    """This process's batches of the epoch from batch `start` on: the streaming path's sampler
    (one permutation dealt to the processes), the grids from memory. `ahead`: that many batches
    made ahead in a thread of their own while the model trains (training on a GPU: the captions
    sampled and padded, the grids gathered, off the step's thread); the same batches."""
    def made():
        if ahead > 0 and resident.target.type == "cuda":
            torch.cuda.set_device(resident.target)  # the thread's CUDA calls on this process's GPU, not GPU 0
        for indices in EpochBatches(len(resident), batch_size, rank, world, seed, epoch, start=start):
            yield resident.batch(indices, vocab, seq_per_img, max_length, seed, epoch)
    return ReadAhead(made(), limit=ahead) if ahead > 0 else made()
