"""Stage 2: train the soft-attention decoder over cached features with HuggingFace Accelerate.

    python caption/train.py --config configs/shapes.yaml                      # one process
    accelerate launch caption/train.py --config configs/coco.yaml             # every GPU here
    python caption/train.py --config configs/coco.yaml --resume true          # continue `last`

Every field of the YAML's data/model/train sections is a flag (`--batch_size 10
--learning_rate 5e-4 --max_epochs 25 --checkpoint_path log_st --id st`). The run folder's
layout is in caption/run.py.

Reads top down: `main` -> `train` (set up, then the epoch loop) -> `setup` and the builders it
calls -> `train_one_epoch` -> `after_step` -> `validate_and_save` -> `validate` -> helpers.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python caption/train.py` / `accelerate launch caption/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs,
                               ProjectConfiguration, broadcast, gather_object, set_seed)
from tqdm import tqdm

from caption.data import collate, encode_record, train_batches
from caption.decode import decode_records
from caption.encoder import CachedGrids, Captioner, FineTuned, backbone_from_manifest
from caption.finetune import image_batches
from caption.metrics import score
from caption.model import Decoder, sequence_loss
from caption.noise import RowNoise
from caption.objective import CrossEntropy, HardAttention, SelfCritical, TrainStep
from caption.resident import (WHERE, MemoryBudgetError, ResidentFeatures, batches_ahead, choose, resident_batches,
                              shared_path)
from caption.run import (check_compatible, features_dir, load_into, load_progress, load_weights, record_features,
                         resume_dir, run_features, save_state, save_weights)
from caption.scst import CiderD, reward_document_counts
from caption.splits import Split, check_split, from_records, open_split
from caption.vocab import Vocab, build_from_split_file, count_store_words
from common import config as C
from common.cli import command
from common.errors import UserError
from common.files import atomic_write_text
from common.log import get_logger
from common.tensors import default_device
from shards.karpathy import load_split
from shards.manifest import identity
from shards.passes import count_records


log = get_logger(__name__)  # the main process's lines, unless asked of every one (common/log.py)


class TrainError(UserError):
    """A training run that cannot start or go on as asked."""


class StopSignals:
    """SIGTERM (SLURM preemption, scancel, `timeout`, `docker stop`, Kubernetes) and SIGUSR1 (SLURM's
    `--signal=USR1@SECONDS` warning ahead of the end): finish the current step, save `last` and the
    resume state, exit with 128 + the signal. The handler only notes the signal: the processes agree
    on it through the step's own all-reduce (so every rank stops after the same step), and a second
    signal during the save changes nothing (the state is written to state.tmp, then renamed)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in self.SIGNALS}
            follow_the_launcher()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _note(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            sys.stderr.write(f"{name}: already stopping; the state being saved replaces the previous one only when "
                             "complete\n")
        else:
            self.signum = signum
            sys.stderr.write(f"{name}: saving `last` and the resume state after this step, then exiting\n")
        sys.stderr.flush()


def follow_the_launcher() -> None:
    """Under torchrun (or `accelerate launch`), a worker whose launcher dies gets SIGTERM (Linux's
    parent-death signal): it saves and stops with its peers, where it would otherwise train on as
    an orphan (torchrun starts each worker in a session of its own, so killing a node's process
    group kills only the agent) and hold the other nodes in the job."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Progress:
    """Where a run is; saved as state/progress.json with every checkpoint, read back on --resume."""
    epoch: int = 0
    batch: int = 0  # batches of this epoch done by each process
    step: int = 0  # optimizer steps
    best: float | None = None  # best validation value of `select_on` (None: nothing validated yet)
    best_step: int = -1
    bad_validations: int = 0  # validations in a row without a better value (early stopping)
    batches_total: int = 0  # batches done by each process over every session of the run
    validated_step: int | None = None  # the step of the last validation
    history: list = field(default_factory=list)  # every validation's select_on value, higher is better

    @classmethod
    def from_json(cls, d, where: str = "progress.json") -> "Progress":
        """The saved record, every field present with its type, or a TrainError naming the file (a
        record that is JSON but not a progress record must not restart the run at step 0)."""
        if not isinstance(d, dict):
            raise TrainError(f"{where}: not a training progress record (a JSON {type(d).__name__}, not an object)")
        optional = {"best": (int, float), "validated_step": (int,)}  # may be null
        values = {}
        history = d.get("history", [])  # absent in states saved before it was kept
        if not (isinstance(history, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in history)):
            raise TrainError(f"{where}: 'history' is not a list of finite numbers")
        for f in dataclasses.fields(cls):
            if f.name == "history":
                values[f.name] = [float(v) for v in history]
                continue
            if f.name not in d:
                raise TrainError(f"{where}: not a training progress record (no {f.name!r}); restore the state "
                                 "folder or start another run")
            v, types = d[f.name], optional.get(f.name, (int,))
            ok = (v is None and f.name in optional) or (isinstance(v, types) and not isinstance(v, bool))
            if not ok or (isinstance(v, float) and not math.isfinite(v)) or (f.name not in optional and v < -1):
                raise TrainError(f"{where}: {f.name!r} is {v!r}, not a valid value")
            values[f.name] = v
        return cls(**values)


@dataclass
class Training:
    """What the loop's parts share, built once by `setup`."""
    cfg: C.Config
    run: Path
    accelerator: Accelerator
    vocab: Vocab
    step: torch.nn.Module  # the prepared (DDP-wrapped) TrainStep: the model (.net) and the objectives
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: Progress
    batches_per_epoch: int
    data: dict[str, Split]  # train and val, each store opened once (caption/splits.py)
    batches: object  # (epoch, start) -> this epoch's batches from `start` on, chosen in setup (`build_batches`)
    stop: StopSignals = field(default_factory=StopSignals)  # a stop signal noted by this process
    stopping: bool = False  # some process noted a stop signal (agreed on through the step's all-reduce)
    saved_at: float = field(default_factory=time.monotonic)  # the last save of the state (save_every_minutes)

    @property
    def net(self) -> Captioner:
        """The model being trained: encoder (cached grids, or the backbone when fine-tuning) + decoder."""
        return self.accelerator.unwrap_model(self.step).net


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caption/train.py", description=__doc__.split("\n\n")[0])
    cfg, _ = C.parse(argv, parser, ("data", "model", "train"))
    return train(cfg)


SAVED = ("at step {step}; `last` and the resume state are saved. Continue with the same command and --resume true "
         "(or --resume auto)")


def train(cfg: C.Config) -> int:
    """Train until max_epochs (or max_steps); 130 when interrupted (the state saved first)."""
    job = setup(cfg)
    tcfg, p, accelerator = job.cfg.train, job.progress, job.accelerator
    seen_before = p.batches_total
    interrupted = False
    with job.stop:  # until the last save is written: a signal then only says so
        interrupted = train_loop(job)
        if job.stopping:
            save_state(accelerator, job.run, dataclasses.asdict(p), job.net)
            name = signal.Signals(job.stop.signum).name if job.stop.signum else "a stop signal on another process"
            who = f"rank {accelerator.process_index}/{accelerator.num_processes}: " if accelerator.num_processes > 1 else ""
            log.info(f"{who}{job.run}: stopped by {name} {SAVED.format(step=p.step)}", main_process_only=False)
            write_hparams(job)
            accelerator.end_training()
            return 128 + (job.stop.signum or signal.SIGTERM)
        if interrupted:
            save_state(accelerator, job.run, dataclasses.asdict(p), job.net)
            log.info(f"{job.run}: interrupted {SAVED.format(step=p.step)}")
        elif p.validated_step != p.step:
            validate_and_save(job)
    write_hparams(job)
    accelerator.end_training()
    if p.batches_total == seen_before:  # a rerun of a finished run
        log.info(f"{job.run}: already trained to its end (step {p.step}): nothing to do")
    else:
        log.info(f"rank {accelerator.process_index}/{accelerator.num_processes}: {p.batches_total - seen_before} batches "
                 "this run", main_process_only=False)
    best = "none" if p.best is None else f"{abs(p.best):.3f}"  # (nll is kept negated: higher is better)
    metric = "CIDEr-D" if tcfg.select_on == "cider" else "NLL"
    stop = " (stopped early)" if stopped_early(job) else ""
    log.info(f"{job.run}: {p.step} steps{stop}; best val {metric} {best} at step {p.best_step}")
    return 130 if interrupted else 0


def write_hparams(job: Training) -> None:
    """TensorBoard's HPARAMS view: the run's model and training settings with what they achieved
    (the best validation value of `select_on`, at which step, and the steps done)."""
    if not job.accelerator.is_main_process:
        return
    sections = C.to_dict(job.cfg)
    settings = {f"{s}.{k}": v for s in ("model", "train") for k, v in sections[s].items()
                if isinstance(v, (int, float, str, bool))}
    p, metric = job.progress, "CIDEr-D" if job.cfg.train.select_on == "cider" else "NLL"
    results = {"hparam/steps": p.step, "hparam/best_step": p.best_step}
    if p.best is not None:
        results[f"hparam/best_val_{metric}"] = abs(p.best)  # (NLL is kept negated: higher is better)
    job.accelerator.get_tracker("tensorboard", unwrap=True).add_hparams(settings, results, run_name=".")


def train_loop(job: Training) -> bool:
    """The epochs, until max_epochs, max_steps, early stopping or a stop signal; True when
    interrupted by Ctrl-C."""
    tcfg, p, accelerator = job.cfg.train, job.progress, job.accelerator
    try:
        if job.net.encoder.reads_images and p.step == 0 and resume_dir(job.run) is None:
            validate_and_save(job)  # step 0: the cached run's decoder on grids from the same backbone
        while p.epoch < tcfg.max_epochs and not stopped_early(job):
            batches = job.batches(p.epoch, p.batch)
            try:
                more = train_one_epoch(job, batches)
            finally:
                if hasattr(batches, "close"):  # batches made ahead in a thread: it stops
                    batches.close()
            if not more:
                break  # max_steps or early stopping
            p.epoch, p.batch = p.epoch + 1, 0
            if not tcfg.save_checkpoint_every:
                validate_and_save(job)
    except (RuntimeError, OSError) as e:
        if not lost_peer(accelerator, e):
            raise
        raise TrainError(f"{job.run}: lost another process of this {accelerator.num_processes}-process run at step "
                         f"{p.step} ({str(e).strip().splitlines()[0][:200]}); the last saved state is in {job.run}/state: "
                         "rerun every node's command with --resume") from None
    except KeyboardInterrupt:
        log.info("interrupted: saving `last` before exiting")
        return True
    return False


# ---- setup, in the order it happens --------------------------------------------------------
def setup(cfg: C.Config) -> Training:
    """Open and check the data, build vocabulary, model, objectives, optimizer and schedule, and
    resume if asked. The order is fixed (the seed is set right before the model's random init)."""
    tcfg = C.require_paths(cfg, "data.features", "train.checkpoint_path").train
    run = C.run_dir(tcfg)
    run.mkdir(parents=True, exist_ok=True)
    accelerator = build_accelerator(tcfg, run)
    cfg = resolve_batch(cfg, accelerator.num_processes)
    train_split = open_split(features_dir(cfg, "train"), "train", url_timeout=cfg.data.url_timeout)
    cfg = with_split_file(cfg, train_split.manifest)
    cfg = resolve_resume(cfg, run)
    data = open_data(cfg, train_split)
    check_data(cfg, run, data, cfg.train.resume == "true", accelerator.is_main_process)  # now, not at the first validation
    vocab = build_vocab(cfg, run, data, accelerator)
    tcfg = cfg.train  # resolved: batch per process, resume
    manifest = data["train"].manifest
    set_seed(tcfg.seed)  # before the model's random init
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=len(vocab),
                                                             feature_dim=int(manifest["channels"])))
    decoder = Decoder(cfg.model)
    state_dir = check_resume(cfg, run)
    net = build_net(decoder, cfg, vocab, manifest)
    if accelerator.is_main_process:
        C.save(cfg, run / "config.yaml")  # the resolved config, before the first step

    world = accelerator.num_processes
    batches_per_epoch = manifest["count"] // (tcfg.batch_size * world)
    if batches_per_epoch == 0:
        raise TrainError(f"{features_dir(cfg, 'train')}: {manifest['count']} images cannot fill a batch of "
                         f"{tcfg.batch_size} on {world} process(es)")
    steps_per_epoch = max(1, batches_per_epoch // tcfg.gradient_accumulation_steps)
    optimizer = build_optimizer(net, tcfg)
    step = TrainStep(net, build_objectives(cfg, vocab, data, world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, steps_per_epoch))
    step, optimizer, scheduler = accelerator.prepare(step, optimizer, scheduler)

    progress = Progress()
    if state_dir is not None:
        progress = Progress.from_json(load_progress(state_dir), str(state_dir / "progress.json"))
        try:
            accelerator.load_state(str(state_dir))  # weights_only loads inside Accelerate
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as e:
            raise TrainError(f"{state_dir}: the saved state cannot be loaded ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no detail'}); "
                             "restore it, or start another run") from None
        if progress.batch >= batches_per_epoch:
            progress.epoch, progress.batch = progress.epoch + 1, 0
    if accelerator.is_main_process:  # a killed run logged steps this one will log again
        drop_rows_after(run / "metrics.jsonl", progress.step)
    describe_batches(accelerator, run, tcfg, batches_per_epoch, steps_per_epoch, manifest["backend"])
    accelerator.init_trackers("caption")  # the hyperparameters go in at the end, with the results (`write_hparams`)
    batches = build_batches(cfg, data, vocab, accelerator.unwrap_model(step).net, accelerator)
    return Training(cfg, run, accelerator, vocab, step, optimizer, scheduler, progress, batches_per_epoch, data, batches)


def open_data(cfg: C.Config, train: Split) -> dict[str, Split]:
    """The train and val splits, each store opened once; a split file is parsed once for both."""
    val = open_split(features_dir(cfg, "val"), "val", url_timeout=cfg.data.url_timeout)
    if not train.from_records:
        entries = load_split(cfg.data.input_json, "all")
        for split in (train, val):
            split.attach(entries, cfg.data.input_json, cfg.data.restval_in_train)
    return {"train": train, "val": val}


def build_objectives(cfg: C.Config, vocab: Vocab, data: dict[str, Split], world: int) -> dict[str, torch.nn.Module]:
    """The run's objectives by name, the first the one it starts with: cross entropy (or hard
    attention's), then self-critical from epoch `self_critical_after` when asked."""
    tcfg = cfg.train
    if cfg.model.attention == "hard":
        first = HardAttention(vocab.pad_id, tcfg.alpha_c, tcfg.seq_per_img, tcfg.entropy_weight, tcfg.baseline_decay,
                              world, tcfg.loss_per)
    else:
        first = CrossEntropy(vocab.pad_id, tcfg.alpha_c, tcfg.seq_per_img, tcfg.loss_per)
    objectives = {"xent": first}
    if tcfg.self_critical_after >= 0:
        objectives["scst"] = SelfCritical(build_cider(cfg, vocab, data["train"]), vocab, tcfg.sc_sample_n,
                                          tcfg.sc_baseline, tcfg.max_length, tcfg.sc_references == "labels", tcfg.sc_eos,
                                          tcfg.loss_per)
    return objectives


def objective_at(tcfg: C.TrainConfig, epoch: int) -> str:
    """The objective an epoch trains with: self-critical from `self_critical_after` on."""
    return "scst" if 0 <= tcfg.self_critical_after <= epoch else "xent"


def build_cider(cfg: C.Config, vocab: Vocab, train: Split) -> CiderD:
    """CIDEr-D's document frequencies from the training references, as the reward reads them."""
    tcfg = cfg.train
    count = functools.partial(reward_document_counts, vocab=vocab, max_length=tcfg.max_length,
                              labels=tcfg.sc_references == "labels", eos=tcfg.sc_eos)
    df = count_records([train.store], count)  # every process: shard by shard, in its share of the cores when large
    return CiderD.from_counts(df, train.store.manifest["count"])


def build_batches(cfg: C.Config, data: dict[str, Split], vocab: Vocab, net: Captioner, accelerator: Accelerator):
    """(epoch, start) -> that epoch's batches from batch `start` on, for this process: the train
    features held in memory (`features_in_memory`), streamed from the store, or images when the
    encoder reads them (fine-tuning). Chosen once."""
    tcfg, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    common = dict(batch_size=tcfg.batch_size, seq_per_img=tcfg.seq_per_img, max_length=tcfg.max_length, seed=tcfg.seed)
    loader = dict(rank=rank, world=world, num_workers=tcfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    train = data["train"]
    resident = load_resident(cfg, train, accelerator)
    if resident is not None:
        ahead = batches_ahead(accelerator.device)
        return lambda epoch, start: resident_batches(resident, vocab, epoch=epoch, start=start, rank=rank, world=world,
                                                     ahead=ahead, **common)
    if net.encoder.reads_images:
        entries = train.entries_in_store()  # the images the cached run trained on (no failures, --limit)
        size = int(train.manifest["image_size"])
        return lambda epoch, start: image_batches(entries, C.images_root(cfg.data), size, vocab, epoch=epoch,
                                                  start=start, **common, **loader)[1]
    return lambda epoch, start: train_batches(train.store, vocab, shuffle_buffer=tcfg.shuffle_buffer, epoch=epoch,
                                              start=start, **common, **loader)[1]


def least_over_processes(accelerator: Accelerator, value: int) -> int:
    """The smallest of every process's `value` (Accelerate's reduce has max and sum, not min)."""
    return -int(accelerator.reduce(torch.tensor(-float(value), device=accelerator.device), "max").item())


def load_resident(cfg: C.Config, train: Split, accelerator: Accelerator) -> ResidentFeatures | None:
    """The train features in RAM or on the GPU (`train.features_in_memory`), when asked and within the
    budget, every process holding them all (RAM: one copy per machine, in shared memory); None:
    batches stream from the store. Every process acts on the same choice."""
    tcfg, manifest = cfg.train, train.manifest
    if tcfg.features_in_memory == "off" or (tcfg.finetune and tcfg.features_in_memory == "auto"):
        return None
    if tcfg.finetune:
        raise TrainError("--features_in_memory: fine-tuning reads images, not cached features; use off")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if accelerator.num_processes > 1 else 1
    need = manifest["count"] * manifest["grid"] ** 2 * manifest["channels"] * 2
    try:
        where, why = choose(tcfg.features_in_memory, need, accelerator.device, tcfg.memory_budget_gb, shared=local > 1)
        code = WHERE.index(where)
    except MemoryBudgetError as e:
        where, why, code = "off", str(e), -1
    agreed = least_over_processes(accelerator, code)  # what every process can do
    if agreed == -1:
        raise MemoryBudgetError(why if code == -1 else f"--features_in_memory {tcfg.features_in_memory}: the train "
                                "features do not fit the budget on another process (its log says why)")
    if agreed < code:
        why = f"{why}; another process can hold only {WHERE[agreed]}: {WHERE[agreed]} on every process"
        where = WHERE[agreed]
    if where == "off":
        log.info(why)
        return None
    shared = None
    if where == "ram" and local > 1:  # one copy for this machine's processes
        shared = (shared_path(C.run_dir(tcfg)), accelerator.local_process_index == 0, accelerator.wait_for_everyone)
    resident = ResidentFeatures(train.store, where, accelerator.device, progress=accelerator.is_main_process,
                                shared=shared)
    copies = f", one copy shared by this machine's {local} processes" if shared else ""
    log.info(f"{why}; every process holds all {len(resident)} train images ({resident.nbytes} bytes{copies}) "
             "and takes the streaming path's batches")
    return resident


def describe_batches(accelerator: Accelerator, run: Path, tcfg: C.TrainConfig, batches_per_epoch: int,
                     steps_per_epoch: int, backend: str) -> None:
    """The first lines of the log: batches per process, and the global batch, updates and learning rate."""
    world = accelerator.num_processes
    log.info(f"{run}: {world} process(es) on {accelerator.device}, {batches_per_epoch} batches of {tcfg.batch_size} "
             f"images x {tcfg.seq_per_img} captions per epoch per process ({backend} features)")
    images = tcfg.batch_size * world * tcfg.gradient_accumulation_steps
    total = steps_per_epoch * tcfg.max_epochs
    total = min(tcfg.max_steps, total) if tcfg.max_steps else total
    log.info(f"global batch: {images} images x {tcfg.seq_per_img} = {images * tcfg.seq_per_img} captions per "
             f"optimizer step; {steps_per_epoch} updates per epoch, {total} in all; learning rate {tcfg.learning_rate:g}")


def lost_peer(accelerator: Accelerator, e: BaseException) -> bool:
    """Whether an error is a collective that failed because another process (a node) went away or
    stopped answering within `dist_timeout`: torch.distributed's own errors, or a backend's (gloo,
    NCCL, c10d) by its text. A read from a store that timed out is not one."""
    if accelerator.num_processes == 1:
        return False
    if isinstance(e, torch.distributed.DistError):
        return True
    return any(w in str(e).lower() for w in ("gloo", "nccl", "c10d", "processgroup"))


def resolve_batch(cfg: C.Config, world: int) -> C.Config:
    """The per-process batch from `global_batch_size` (which must divide by processes x
    accumulation), or the learning rate scaled linearly with them when `scale_lr` asks."""
    tcfg = cfg.train
    per_step = world * tcfg.gradient_accumulation_steps
    if tcfg.global_batch_size:
        if tcfg.global_batch_size % per_step:
            raise TrainError(f"--global_batch_size {tcfg.global_batch_size} does not divide over {world} process(es) x "
                             f"{tcfg.gradient_accumulation_steps} accumulation step(s)")
        tcfg = dataclasses.replace(tcfg, batch_size=tcfg.global_batch_size // per_step)
    elif tcfg.scale_lr and per_step > 1:
        tcfg = dataclasses.replace(tcfg, learning_rate=tcfg.learning_rate * per_step, scale_lr=False)
    return dataclasses.replace(cfg, train=tcfg)


def join_restarted_group(timeout: datetime.timedelta) -> None:
    """A worker torchrun restarted (`--max_restarts`) joins the process group under keys of its own
    attempt: the agent keeps its store across attempts, and gloo's (or NCCL's) rendezvous would
    otherwise read the previous attempt's addresses and fail with "Connection refused"."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or int(os.environ.get("WORLD_SIZE", "1")) < 2 or torch.distributed.is_initialized():
        return
    store, rank, world = next(torch.distributed.rendezvous("env://", timeout=timeout))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore(f"attempt_{attempt}/", store),
                                         rank=rank, world_size=world, timeout=timeout)


def build_accelerator(tcfg: C.TrainConfig, run: Path) -> Accelerator:
    join_restarted_group(datetime.timedelta(seconds=tcfg.dist_timeout))
    kwargs = {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=tcfg.finetune and tcfg.finetune_start > 0),
                                  InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=tcfg.dist_timeout))]}
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # the launcher's --mixed_precision wins
        kwargs["mixed_precision"] = tcfg.mixed_precision
    # split_batches: our batches are already per process (the loaders are not prepared), and with it
    # the prepared scheduler steps once per optimizer step, not once per process.
    kwargs["dataloader_config"] = DataLoaderConfiguration(split_batches=True)
    return Accelerator(cpu=default_device().type == "cpu", gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
                       log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "tb")),
                       **kwargs)


def with_split_file(cfg: C.Config, manifest: dict) -> C.Config:
    """The config with the split file the train features were made from, when the configured one
    does not exist: the manifest records it (and the image root), so training needs only --features."""
    if from_records(manifest):
        if cfg.train.finetune:
            raise TrainError(f"{features_dir(cfg, 'train')}: made from input shards; fine-tuning reads images from a "
                             "split file (--input_json)")
        return cfg  # the records hold the captions: no split file is read
    if Path(cfg.data.input_json).is_file() or not manifest.get("input_json") or not Path(manifest["input_json"]).is_file():
        return cfg
    log.info(f"{cfg.data.input_json or '(no --input_json)'}: not a file; using the split file the train features "
             f"were made from, {manifest['input_json']}")
    data = dataclasses.replace(cfg.data, input_json=manifest["input_json"],
                               images_root=cfg.data.images_root or manifest.get("images_root", ""))
    return dataclasses.replace(cfg, data=data)


def check_data(cfg: C.Config, run: Path, data: dict[str, Split], resume: bool, is_main: bool = True) -> None:
    """Train and val features from one encoder (and, resuming, the one the run started on); every
    record an image of its split in the split file (none smuggled in), or for stores made from
    input shards, no image in both. Records the encoder in RUN/features.json, which evaluation
    checks its features against."""
    train, val = data["train"], data["val"]
    if resume and (run / "features.json").exists():
        expected, against = run_features(run, cfg)
        check_split(train, expected, against)
    check_split(train, others=(val,))
    check_split(val, identity(train.manifest), f"the train features ({train.root})")
    if is_main:
        record_features(run, train.manifest)


def build_vocab(cfg: C.Config, run: Path, data: dict[str, Split], accelerator: Accelerator) -> Vocab:
    """The run's vocabulary: vocab.json when it exists (resume, init_from), else from train captions."""
    path = run / "vocab.json"
    if cfg.train.init_from and not (Path(cfg.train.init_from) / "vocab.json").is_file():
        raise TrainError(f"--init_from {cfg.train.init_from}: no such run folder (no vocab.json there)")
    if cfg.train.init_from and not path.exists() and accelerator.is_main_process:
        shutil.copy(Path(cfg.train.init_from) / "vocab.json", path)
    if not path.exists() and accelerator.is_main_process:
        if data["train"].from_records:  # the records' captions
            splits = ("train", "val") if cfg.train.count_splits == "all" else ("train",)
            # shard by shard, in processes when large: every core, the other processes wait for vocab.json
            counts = count_store_words([data[s].store for s in splits], alone=True)
            Vocab.from_counts(counts, cfg.train.word_count_threshold).save(path)
        else:
            build_from_split_file(cfg.data.input_json, cfg.train.word_count_threshold, cfg.train.count_splits,
                                  cfg.data.restval_in_train).save(path)
    accelerator.wait_for_everyone()
    return Vocab.load(path)


def resolve_resume(cfg: C.Config, run: Path) -> C.Config:
    """`--resume auto` becomes true when the run folder holds a saved state, else false (a launcher
    that restarts workers, or a requeued job, then continues by itself)."""
    if cfg.train.resume != "auto":
        return cfg
    resume = "true" if resume_dir(run) is not None else "false"
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=resume))


def check_resume(cfg: C.Config, run: Path) -> Path | None:
    """The state folder to resume from (None: a fresh run), after checking the run folder agrees."""
    if cfg.train.resume == "false":
        if (run / "state").exists() or (run / "state.old").exists():
            raise TrainError(f"{run}: holds a run already; pass --resume true (or auto) to continue it, or choose "
                             "another --checkpoint_path/--id")
        if (run / "metrics.jsonl").exists():
            log.warning(f"{run}: metrics.jsonl holds rows of an earlier run that saved no state; starting over at "
                        "step 0 and dropping them")
        return None
    state_dir = resume_dir(run)
    if state_dir is None:
        raise TrainError(f"{run}: --resume but no saved state (state/progress.json) there")
    if C.load(run / "config.yaml").model != cfg.model:
        raise TrainError(f"{run / 'config.yaml'}: model settings differ from this command's; resume with the same model")
    return state_dir


def build_net(decoder: Decoder, cfg: C.Config, vocab: Vocab, manifest: dict) -> Captioner:
    """The model: the decoder (from `init_from`'s best weights when given) behind its encoder, the
    cached grids, or when fine-tuning the backbone that made them."""
    tcfg = cfg.train
    if tcfg.finetune and not tcfg.init_from:
        raise TrainError("--finetune needs --init_from RUN: a cached-feature run whose decoder and vocabulary it starts from")
    if tcfg.init_from and tcfg.resume != "true":
        weights = load_weights(tcfg.init_from, "best")
        check_compatible(Path(tcfg.init_from), cfg, vocab, weights)
        load_into(decoder, weights, Path(tcfg.init_from) / "best.safetensors")
    if not tcfg.finetune:
        return Captioner(CachedGrids(), decoder)
    encoder = FineTuned(backbone_from_manifest(manifest, cfg.data.features), list(tcfg.finetune_layers), tcfg.freeze_bn,
                        tcfg.activation_checkpointing, tcfg.finetune_start, int(manifest["image_size"]),
                        C.images_root(cfg.data))
    return Captioner(encoder, decoder)


def build_optimizer(net: Captioner, tcfg: C.TrainConfig) -> torch.optim.Optimizer:
    """Adam; a fine-tuned encoder's blocks at their own learning rate and weight decay."""
    groups = [{"params": list(net.decoder.parameters())}]
    if net.encoder.params:
        groups.append({"params": net.encoder.params, "lr": tcfg.cnn_learning_rate, "weight_decay": tcfg.cnn_weight_decay})
    return torch.optim.Adam(groups, lr=tcfg.learning_rate, betas=(tcfg.optim_alpha, tcfg.optim_beta),
                            eps=tcfg.optim_epsilon, weight_decay=tcfg.weight_decay)


# ---- the loop -----------------------------------------------------------------------------
def train_one_epoch(job: Training, batches) -> bool:
    """One pass over `batches`; False when max_steps stopped it early."""
    tcfg, p, acc, step = job.cfg.train, job.progress, job.accelerator, job.step
    step.train()
    acc.unwrap_model(step).use(objective_at(tcfg, p.epoch))
    p_ss = ss_prob(tcfg, p.epoch)
    bar = tqdm(total=job.batches_per_epoch, initial=p.batch, desc=f"epoch {p.epoch}", unit="batch",
               disable=not acc.is_main_process, dynamic_ncols=True)
    t0, captions = time.perf_counter(), 0
    for batch in batches:
        inputs = batch["features"].to(acc.device, non_blocking=True)  # (B, g, g, D) grids, or (B, 3, P, P) images
        tokens = batch["tokens"].to(acc.device, non_blocking=True)  # (N = B*S, T)
        targets = batch["targets"].to(acc.device, non_blocking=True)  # (N, T)
        logged = (p.step + 1) % tcfg.log_every == 0
        with acc.accumulate(step):
            with acc.autocast():
                noise = RowNoise.for_batch(tcfg.seed, p.batches_total, inputs.shape[0], tcfg.seq_per_img,
                                           acc.process_index, acc.num_processes, acc.device)
                total, norm, stats = step(inputs, tokens, targets, ss_prob=p_ss, refs=batch["refs"], keys=batch["keys"],
                                          logged=logged, noise=noise)
            global_norm, save_now = agree(job, norm)
            loss = total * acc.num_processes / global_norm  # DDP averages gradients over processes: x world
            if not torch.isfinite(loss):
                raise TrainError(f"loss is {loss.item()} at step {p.step} (epoch {p.epoch}); "
                                 "lower --learning_rate, check the features with `python -m shards verify`")
            acc.backward(loss)
            if acc.sync_gradients and tcfg.grad_clip > 0:
                if tcfg.grad_clip_mode == "value":  # each value, as the seed's and sc's clip_gradient
                    acc.clip_grad_value_(step.parameters(), tcfg.grad_clip)
                else:
                    acc.clip_grad_norm_(step.parameters(), tcfg.grad_clip)
            job.optimizer.step()
            job.scheduler.step()
            job.optimizer.zero_grad(set_to_none=True)
        p.batch += 1
        p.batches_total += 1
        captions += tokens.shape[0]
        bar.update(1)
        if not acc.sync_gradients:
            continue
        p.step += 1
        if p.step % tcfg.log_every == 0:
            rate = captions * acc.num_processes / (time.perf_counter() - t0)
            row = step_row(job, total, stats, global_norm, p_ss, rate)
            shown = {"xent/token": row["xent"]} if "xent" in row else {}
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in {**shown, "loss": row["loss"]}.items()}, "cap/s": f"{rate:.0f}"})
            log_row(job, row)
            t0, captions = time.perf_counter(), 0
        if job.stopping:
            bar.close()
            return False  # train() saves and exits
        after_step(job)
        if save_now and p.validated_step != p.step:
            save_state(acc, job.run, dataclasses.asdict(p), job.net)
            job.saved_at = time.monotonic()
        if (tcfg.max_steps and p.step >= tcfg.max_steps) or stopped_early(job):
            bar.close()
            return False
    bar.close()
    return True


PER_TOKEN = ("xent", "attention_reg")  # stats summed over the batch: logged per token (stats["tokens"])


def agree(job: Training, norm: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One all-reduce per step: the normalizer (tokens, or sampled captions) over every process, so
    each weighs the same however the batch was split; whether any process noted a stop signal; and
    the main process's save_every_minutes clock, so every rank acts on them after the same step.
    Returns (global normalizer, save now); sets job.stopping."""
    acc = job.accelerator
    shared = acc.reduce(torch.stack([norm.detach().float().reshape(()).to(acc.device),
                                     torch.tensor(float(job.stop.signum > 0), device=acc.device),
                                     torch.tensor(float(acc.is_main_process and save_due(job)), device=acc.device)]),
                        reduction="sum")
    job.stopping = job.stopping or bool(shared[1] > 0)
    return shared[0], bool(shared[2] > 0)


def step_row(job: Training, total: torch.Tensor, stats: dict, global_norm: torch.Tensor, p_ss: float, rate: float) -> dict:
    """The metrics.jsonl row of a logged step: the loss (summed over every process's batch, over the
    global normalizer: the same number on 1 or W processes), lr, and the objective's stats over
    processes (xent and the attention regularizer per token; SCST reward and greedy CIDEr-D; the
    hard-attention baseline, averaged)."""
    acc, world = job.accelerator, job.accelerator.num_processes
    names = list(stats)  # the same on every process: one objective, one `logged`
    values = torch.stack([total.detach().float().reshape(()).to(acc.device)]
                         + [stats[k].detach().float().reshape(()).to(acc.device) for k in names])
    summed = dict(zip(["loss", *names], acc.reduce(values, "sum").tolist()))  # one all-reduce for the row
    row = {"step": job.progress.step, "epoch": job.progress.epoch, "loss": summed.pop("loss") / global_norm.item(),
           "lr": job.scheduler.get_last_lr()[0], "ss_prob": p_ss, "captions_per_s": rate}
    tokens = summed.pop("tokens", None)
    for k, v in summed.items():
        row[k] = v / tokens if k in PER_TOKEN else v / world
    return row


def after_step(job: Training) -> None:
    """After each optimizer step: the encoder learns the step (a fine-tuned backbone trains from
    `finetune_start` on); validate and checkpoint every `save_checkpoint_every` steps."""
    tcfg, p = job.cfg.train, job.progress
    job.net.encoder.at_step(p.step)
    if tcfg.save_checkpoint_every and p.step % tcfg.save_checkpoint_every == 0:
        validate_and_save(job)


def validate_and_save(job: Training) -> None:
    """Score the val split; a better `select_on` value writes best.safetensors; then `last` and the state."""
    acc, p, tcfg = job.accelerator, job.progress, job.cfg.train
    scores = validate(job)  # every process takes part
    nll = scores.get("NLL")
    if acc.is_main_process:
        log_row(job, {"step": p.step, "epoch": p.epoch, **{f"val_{k}": v for k, v in scores.items()}})
        log.info(f"step {p.step}: val CIDEr-D {scores['CIDEr']:.3f} BLEU-4 {scores['Bleu_4']:.3f}"
                 + (f" NLL {nll:.4f}" if nll is not None else ""))
        value = scores["CIDEr"] if tcfg.select_on == "cider" else -nll  # higher is better
        judge(p, value, tcfg)
        if p.best_step == p.step:
            save_weights(job.net, job.run / "best.safetensors")
    # the main process decided; every process takes its values (None: nothing validated yet)
    best, bad, best_step = broadcast_main(acc, [-math.inf if p.best is None else p.best, float(p.bad_validations),
                                                float(p.best_step)])
    p.best, p.bad_validations, p.best_step = (None if best == -math.inf else best), int(bad), int(best_step)
    p.validated_step = p.step
    save_state(acc, job.run, dataclasses.asdict(p), job.net)
    job.saved_at = time.monotonic()


def save_due(job: Training) -> bool:
    """`save_every_minutes` have passed since the last save (decided by the main process's clock)."""
    minutes = job.cfg.train.save_every_minutes
    return bool(minutes) and time.monotonic() - job.saved_at >= 60 * minutes


def judge(p: Progress, value: float, tcfg: C.TrainConfig) -> None:
    """Record a validation's `select_on` value (higher is better): a new best, or one more bad
    validation by `early_stop_rule`. consecutive: better than the best, else bad. authors (capgen.py
    1340-1353, its errors negated): at least the best so far is a new best and resets the count; from
    epoch patience + 1 on, with more than patience values, a value no better than the best before the
    last patience ones counts as bad."""
    history = [*p.history, value]
    if tcfg.early_stop_rule == "authors":
        patience = tcfg.early_stop_patience
        if value >= max(history):
            p.best, p.best_step, p.bad_validations = value, p.step, 0
        if patience and p.epoch > patience and len(history) > patience and value <= max(history[:-patience]):
            p.bad_validations += 1
    elif p.best is None or value > p.best:
        p.best, p.best_step, p.bad_validations = value, p.step, 0
    else:
        p.bad_validations += 1
    p.history = history


def stopped_early(job: Training) -> bool:
    """Early stopping by `early_stop_rule` (the same on every process): `early_stop_patience`
    validations in a row without a better value, or capgen's count exceeding the patience."""
    tcfg = job.cfg.train
    bad, patience = job.progress.bad_validations, tcfg.early_stop_patience
    return bool(patience) and (bad > patience if tcfg.early_stop_rule == "authors" else bad >= patience)


@torch.no_grad()
def validate(job: Training) -> dict[str, float]:
    """The val split's first `val_images_use` images, each process decoding its share: greedy
    captions scored with CIDEr-D and BLEU-4, and with `select_on nll` the mean per-token NLL of
    their captions (seq_per_img each, teacher forced), all from the same grids (read from the
    store, or computed now by a fine-tuned encoder). {} on processes other than the main one."""
    acc, net, tcfg = job.accelerator, job.net, job.cfg.train
    was_training = net.training
    net.eval()
    records = net.encoder.records(job.data["val"], acc.process_index, acc.num_processes, tcfg.val_images_use, acc.device)
    mine, nll = [], torch.zeros(2, dtype=torch.float64, device=acc.device)  # summed NLL, tokens
    # 64 images at a time: COCO's 5,000 val grids at once would take 4 GB of memory.
    for i, chunk in enumerate(iter(lambda: list(itertools.islice(records, 64)), [])):
        mine += decode_records(net.decoder, job.vocab, chunk, device=acc.device, beam_size=1, batch_size=64)
        if tcfg.select_on == "nll":
            nll += chunk_nll(job, chunk, i)
    everyone = gather_object(mine)
    nll = acc.reduce(nll, reduction="sum")
    net.train(was_training)
    if not acc.is_main_process:
        return {}
    results = {r["image_id"]: r["caption"] for r in everyone}
    metrics, _ = score(job.data["val"].references(results), results, scorers=("Bleu", "CIDEr"))
    scores = {"CIDEr": metrics.get("CIDEr", 0.0), "Bleu_4": metrics.get("Bleu_4", 0.0)}
    if tcfg.select_on == "nll":
        scores["NLL"] = float(nll[0] / nll[1].clamp_min(1))
    return scores


def chunk_nll(job: Training, chunk: list[dict], i: int) -> torch.Tensor:
    """(summed NLL, tokens) of the i-th chunk of val records' captions, seq_per_img per image
    picked by (seed, image's place), teacher forced."""
    acc, tcfg = job.accelerator, job.cfg.train
    items = [encode_record(r, job.vocab, tcfg.seq_per_img, tcfg.max_length, np.random.default_rng([tcfg.seed, 64 * i + j]))
             for j, r in enumerate(chunk)]
    b = collate(items, job.vocab)
    out = job.net.decoder(b["features"].to(acc.device), b["tokens"].to(acc.device), tcfg.seq_per_img)
    _, xent, ntok = sequence_loss(out.logits, b["targets"].to(acc.device), out.alphas, job.vocab.pad_id, 0.0)
    return torch.stack([xent.double(), ntok.double()])  # xent is summed over the tokens


TB_NAMES = {"val_CIDEr": "val/CIDEr-D", "val_Bleu_4": "val/BLEU-4", "val_NLL": "val/NLL"}


def tb_name(key: str) -> str:
    """A metrics.jsonl key as TensorBoard shows it: grouped under train/ and val/, named as the paper's tables."""
    return TB_NAMES.get(key) or (f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}")


def log_row(job: Training, row: dict) -> None:
    """A row to TensorBoard (every process calls; Accelerate writes on the main one; `tb_name`) and
    to metrics.jsonl (its own keys: val_CIDEr is CIDEr-D)."""
    job.accelerator.log({tb_name(k): v for k, v in row.items() if k not in ("step", "epoch")}, step=row["step"])
    if job.accelerator.is_main_process:
        with open(job.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


# ---- schedules and helpers ---------------------------------------------------------------
def lr_lambda(tcfg: C.TrainConfig, steps_per_epoch: int):
    """The seed's step decay: after epoch `start`, x rate ** ((epoch - start) // every)."""
    def f(step: int) -> float:
        epoch = step // max(steps_per_epoch, 1)
        if tcfg.learning_rate_decay_start < 0 or epoch <= tcfg.learning_rate_decay_start:
            return 1.0
        return tcfg.learning_rate_decay_rate ** ((epoch - tcfg.learning_rate_decay_start) // tcfg.learning_rate_decay_every)
    return f


def ss_prob(tcfg: C.TrainConfig, epoch: int) -> float:
    """Scheduled sampling probability at an epoch (the seed's schedule)."""
    if tcfg.scheduled_sampling_start < 0 or epoch < tcfg.scheduled_sampling_start:
        return 0.0
    frac = (epoch - tcfg.scheduled_sampling_start) // tcfg.scheduled_sampling_increase_every
    return min(tcfg.scheduled_sampling_increase_prob * frac, tcfg.scheduled_sampling_max_prob)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step` (rewritten atomically)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(rows):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(rows) - 1:  # the last line torn by a kill mid-write: dropped
                log.warning(f"{path}: its last line is incomplete (a kill mid-write); dropped")
                continue
            raise TrainError(f"{path}: line {i + 1} is not JSON; repair or delete the line to resume") from None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
            raise TrainError(f"{path}: line {i + 1} is not a metrics row; repair or delete the line to resume")
        if row.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(rows):
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def broadcast_main(accelerator: Accelerator, values: list[float]) -> list[float]:
    """The main process's values on every process."""
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return broadcast(t, from_process=0).tolist()

if __name__ == "__main__":
    raise SystemExit(main())
