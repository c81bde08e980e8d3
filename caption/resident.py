"""The train split held in memory for the whole run: loaded once, as float16, into (pinned) RAM
or the GPU; every epoch after the first then costs only compute.

    train.features_in_memory: off | ram | device | auto     (configs: the `train` section)
    train.memory_budget_gb:   what it may take (0: 80% of the RAM available, 90% of the GPU's free memory)

Under DDP each process holds one contiguous slice of the split (`rank_slice`, n // world images)
and draws its batches from it, shuffled each epoch; with one process that is exactly the
streaming path's order (`caption.data.EpochBatches`), so the batches are the same bit for bit.
The budget is checked before anything is loaded: an explicit `ram`/`device` that does not fit
is an error saying so, `auto` falls back (device, then RAM, then streaming) and says what it chose.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from caption.data import EpochBatches, collate_captions, pick_captions
from caption.vocab import Vocab
from common.errors import UserError

MODES = ("off", "ram", "device", "auto")


class MemoryBudgetError(UserError):
    """The features asked to be resident do not fit the stated memory budget."""


def rank_slice(n: int, rank: int, world: int) -> range:
    """The rows one process holds: a contiguous n // world of them (the tail waits, as in streaming)."""
    per = n // world
    return range(rank * per, (rank + 1) * per)


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


def budget(where: str, device: torch.device, budget_gb: float) -> int:
    """Bytes `where` may hold: the stated budget, or 80% of available RAM / 90% of free GPU memory."""
    if budget_gb > 0:
        return int(budget_gb * 1e9)
    return int(available_bytes(where, device) * (0.9 if where == "device" else 0.8))


def choose(mode: str, need: int, device: torch.device, budget_gb: float = 0.0) -> tuple[str, str]:
    """(where: off|ram|device, why) for `need` bytes; an explicit mode that cannot hold them is an error."""
    gb = need / 1e9
    if mode == "off":
        return "off", "features_in_memory off: streaming from the store"
    if mode == "device" and device.type != "cuda":
        raise MemoryBudgetError("--features_in_memory device: no GPU here; use ram, auto or off")
    if mode in ("ram", "device"):
        have = budget(mode, device, budget_gb)
        if need > have:
            raise MemoryBudgetError(f"--features_in_memory {mode}: this process's slice of the train features needs "
                                    f"{gb:.2f} GB, the budget is {have / 1e9:.2f} GB (--memory_budget_gb; 0: what is "
                                    "free now); stream them (off), or give a larger budget")
        return mode, f"{gb:.2f} GB of features in {mode} (budget {have / 1e9:.2f} GB)"
    tried = []
    for where in (("device", "ram") if device.type == "cuda" else ("ram",)):
        have = budget(where, device, budget_gb)
        if need <= have:
            return where, f"auto: {gb:.2f} GB of features in {where} (budget {have / 1e9:.2f} GB)"
        tried.append(f"{where} {have / 1e9:.2f} GB")
    return "off", f"auto: {gb:.2f} GB of features do not fit ({', '.join(tried)}): streaming from the store"


class ResidentFeatures:
    """Rows `rows` of a feature store as one (n, L, D) float16 tensor in RAM (pinned when a GPU
    will read it) or on `device`, with each record's captions and id; `batch` gathers by index."""

    def __init__(self, store, rows: range, where: str, device: torch.device, progress: bool = True):
        """`store`: an opened feature store (caption/splits.py)."""
        g, c = store.manifest["grid"], store.manifest["channels"]
        self.rows, self.where = rows, where
        self.records = [{k: r[k] for k in ("key", "image_id", "captions")} for r in store.records[rows.start:rows.stop]]
        on_gpu = where == "device"
        host = torch.empty((len(rows), g * g, c), dtype=torch.float16,  # (n, L, D)
                           pin_memory=where == "ram" and device.type == "cuda")
        bar = tqdm(total=len(rows), desc=f"features into {where}", unit="img", disable=not progress)
        for i, rec in enumerate(store.iter_records(span=rows)):
            host[i] = torch.from_numpy(rec["features"].reshape(g * g, c))  # (g, g, D) -> (L, D)
            bar.update(1)
        bar.close()
        self.features = host.to(device) if on_gpu else host
        self.device = self.features.device

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def batch(self, indices: list[int], vocab: Vocab, seq_per_img: int, max_length: int, seed: int, epoch: int) -> dict:
        """The batch `caption.data` would collate for these store indices, bit for bit: the same
        captions per (seed, epoch, image), the grids gathered from memory."""
        items = []
        for i in indices:
            r = self.records[i - self.rows.start]
            rng = np.random.default_rng([seed, epoch, i])  # as CaptionedFeatures: fixed per (seed, epoch, image)
            caps = [vocab.encode(c, max_length) for c in pick_captions(r["captions"], seq_per_img, rng)]
            items.append({"captions": caps, "image_id": int(r["image_id"]), "refs": r["captions"], "key": r["key"],
                          "index": i})
        local = torch.tensor([i - self.rows.start for i in indices], device=self.device)
        return {"features": self.features.index_select(0, local), **collate_captions(items, vocab)}  # (B, L, D)


def resident_batches(resident: ResidentFeatures, vocab: Vocab, *, batch_size: int, seq_per_img: int, max_length: int,
                     seed: int, epoch: int, start: int = 0):
    """This epoch's batches from batch `start` on, from the process's resident slice."""
    sampler = EpochBatches(len(resident.rows), batch_size, 0, 1, seed, epoch, start=start)
    for local in sampler:
        yield resident.batch([resident.rows.start + i for i in local], vocab, seq_per_img, max_length, seed, epoch)
