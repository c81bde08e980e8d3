"""Stage 2: train the soft-attention decoder over cached features with HuggingFace Accelerate.

    python caption/train.py --config configs/shapes.yaml                      # one process
    accelerate launch caption/train.py --config configs/coco.yaml             # every GPU here
    python caption/train.py --config configs/coco.yaml --resume               # continue `last`

Reads top down: main -> build_* -> train_one_epoch -> validate -> checkpoint. Every field of
the YAML's data/model/train sections is a flag (`--batch_size 10 --learning_rate 5e-4
--max_epochs 25 --checkpoint_path log_st --id st`). The run folder gets config.yaml,
vocab.json, best.safetensors / last.safetensors (decoder weights), state/ (Accelerate's
resume state: optimizer, scheduler, RNG, progress), metrics.jsonl and tensorboard events.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python caption/train.py` / `accelerate launch caption/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from caption import config as C
from caption.data import train_batches
from caption.model import Decoder
from caption.objective import Objective
from caption.vocab import Vocab, build_from_split_file
from shards import load_manifest, open_store
from shards.karpathy import DatasetError, expand_split, load_split
from shards.manifest import StoreError, atomic_write_json, check_same_features, foreign_records, identity, read_json


class TrainError(RuntimeError):
    pass


# ---- building blocks ----------------------------------------------------------------
def build_accelerator(tcfg: C.TrainConfig, run: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from accelerate.utils import DistributedDataParallelKwargs
    kwargs = {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=tcfg.finetune and tcfg.finetune_start > 0)]}
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # the launcher's --mixed_precision wins
        kwargs["mixed_precision"] = tcfg.mixed_precision
    return Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
                       log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "tb")),
                       **kwargs)


def build_vocab(cfg: C.Config, run: Path, accelerator) -> Vocab:
    """The run's vocabulary: vocab.json when it exists (resume, init_from), else from train captions."""
    path = run / "vocab.json"
    if cfg.train.init_from and not path.exists() and accelerator.is_main_process:
        shutil.copy(Path(cfg.train.init_from) / "vocab.json", path)
    if not path.exists() and accelerator.is_main_process:
        build_from_split_file(cfg.data.input_json, cfg.train.word_count_threshold, cfg.train.count_splits,
                              cfg.data.restval_in_train).save(path)
    accelerator.wait_for_everyone()
    return Vocab.load(path)


def features_dir(cfg: C.Config, split: str) -> Path:
    return Path(cfg.data.features) / split


def build_model(cfg: C.Config, vocab: Vocab, manifest: dict) -> tuple[Decoder, C.Config]:
    mcfg = dataclasses.replace(cfg.model, vocab_size=len(vocab), feature_dim=int(manifest["channels"]))
    return Decoder(mcfg), dataclasses.replace(cfg, model=mcfg)


def build_net(decoder: Decoder, cfg: C.Config, vocab: Vocab, manifest: dict) -> torch.nn.Module:
    """The decoder (from `init_from`'s best weights when given), wrapped with its backbone when fine-tuning."""
    tcfg = cfg.train
    if tcfg.finetune and not tcfg.init_from:
        raise TrainError("--finetune needs --init_from RUN: a cached-feature run whose decoder and vocabulary it starts from")
    if tcfg.init_from and not tcfg.resume:
        weights = load_file(str(Path(tcfg.init_from) / "best.safetensors"))
        check_compatible(Path(tcfg.init_from), cfg, vocab, weights)
        decoder.load_state_dict(weights)
    if not tcfg.finetune:
        return decoder
    from caption.finetune import Captioner, backbone_from_manifest
    backbone = backbone_from_manifest(manifest, cfg.data.features)
    net = Captioner(backbone, decoder, list(tcfg.finetune_layers), tcfg.freeze_bn, tcfg.activation_checkpointing)
    net.image_size = int(manifest["image_size"])
    return net


def build_optimizer(net: torch.nn.Module, tcfg: C.TrainConfig) -> torch.optim.Optimizer:
    """Adam; when fine-tuning, the backbone's blocks at their own learning rate and weight decay."""
    if tcfg.finetune:
        groups = [{"params": list(net.decoder.parameters())},
                  {"params": net.backbone_params, "lr": tcfg.cnn_learning_rate, "weight_decay": tcfg.cnn_weight_decay}]
    else:
        groups = [{"params": list(net.parameters())}]
    return torch.optim.Adam(groups, lr=tcfg.learning_rate, betas=(tcfg.optim_alpha, tcfg.optim_beta),
                            eps=tcfg.optim_epsilon, weight_decay=tcfg.weight_decay)


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


def check_compatible(run: Path, cfg: C.Config, vocab: Vocab, weights: dict) -> None:
    """A checkpoint must match the vocabulary and the features' channels."""
    emb = weights.get("embed.weight")
    if emb is not None and emb.shape[0] != len(vocab):
        raise TrainError(f"{run}: checkpoint has a {emb.shape[0]}-word vocabulary, vocab.json has {len(vocab)}")
    lz = weights.get("L_z.weight")
    if lz is not None and lz.shape[1] != cfg.model.feature_dim:
        raise TrainError(f"{run}: checkpoint expects {lz.shape[1]}-channel features, {cfg.data.features} has {cfg.model.feature_dim}")


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Decoder weights as safetensors; a fine-tuning Captioner also writes its backbone beside them
    (best -> backbone.safetensors, last -> backbone_last.safetensors)."""
    if hasattr(model, "decoder"):
        model.backbone.save(path.with_name("backbone.safetensors" if path.stem == "best" else "backbone_last.safetensors"))
        model = model.decoder
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_decoder(run: str | Path, which: str = "best", device: str | torch.device = "cpu") -> tuple[Decoder, Vocab, C.Config]:
    """A trained decoder from a run folder: config.yaml, vocab.json and {which}.safetensors."""
    run = Path(run)
    cfg = C.load(run / "config.yaml")
    vocab = Vocab.load(run / "vocab.json")
    path = run / f"{which}.safetensors"
    if not path.exists():
        raise TrainError(f"{path}: no such checkpoint (train first, or pick --checkpoint best|last)")
    weights = load_file(str(path))
    check_compatible(run, cfg, vocab, weights)
    model = Decoder(cfg.model)
    model.load_state_dict(weights)
    return model.to(device).eval(), vocab, cfg


# ---- checkpointing ------------------------------------------------------------------
def save_checkpoint(accelerator, model, run: Path, progress: dict) -> None:
    """`last`: decoder weights (safetensors) + Accelerate state + progress, replaced atomically.

    Every rank saves its own RNG state into state.tmp; then state.tmp becomes state.
    """
    tmp, final, old = run / "state.tmp", run / "state", run / "state.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # save_state has no barrier at its end
    if accelerator.is_main_process:
        # JSON has no infinity: `best` is null until a validation has scored
        (tmp / "progress.json").write_text(json.dumps({**progress, "best": None if progress["best"] == -math.inf
                                                                   else progress["best"]}))
        save_weights(accelerator.unwrap_model(model).net, run / "last.safetensors")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume_dir(run: Path) -> Path | None:
    for d in (run / "state", run / "state.old"):
        if (d / "progress.json").exists():
            return d
    return None


# ---- validation -----------------------------------------------------------------------
@torch.no_grad()
def validate(accelerator, model, vocab: Vocab, cfg: C.Config, split: str = "val",
             entries: list | None = None) -> dict[str, float]:
    """Greedy captions of `val_images_use` images, scored with CIDEr-D and BLEU-4 on the main process.

    `entries`: the split's images (`load_split`), when the caller keeps them between validations.
    """
    from accelerate.utils import gather_object

    from caption.evaluate import decode_records, raw_references
    from caption.metrics import score
    from caption.data import eval_records

    net = accelerator.unwrap_model(model).net
    was_training = net.training
    net.eval()
    rank, world, limit = accelerator.process_index, accelerator.num_processes, cfg.train.val_images_use
    if entries is None:
        entries = load_split(cfg.data.input_json, split, cfg.data.restval_in_train)
    if cfg.train.finetune:  # grids from the backbone as it is now
        from caption.finetune import image_records
        use = entries[:limit] if limit >= 0 else entries
        recs = image_records(use[rank::world], C.images_root(cfg.data), net.image_size, net.backbone, accelerator.device)
        net = net.decoder
    else:
        recs = eval_records(features_dir(cfg, split), rank, world, limit)
    mine = decode_records(net, vocab, recs, device=accelerator.device, beam_size=1, batch_size=64)
    allres = gather_object(mine)
    accelerator.unwrap_model(model).train(was_training)
    if not accelerator.is_main_process:
        return {}
    results = {r["image_id"]: r["caption"] for r in allres}
    metrics, _ = score(raw_references(entries, results), results, scorers=("Bleu", "CIDEr"))
    return {"CIDEr": metrics.get("CIDEr", 0.0), "Bleu_4": metrics.get("Bleu_4", 0.0)}


# ---- the loop ------------------------------------------------------------------------
def train_one_epoch(accelerator, model, optimizer, scheduler, batches, n_batches: int, vocab: Vocab, cfg: C.Config,
                    progress: dict, log, on_step) -> bool:
    """One pass; returns False when max_steps stopped it early."""
    tcfg = cfg.train
    model.train()
    p_ss = ss_prob(tcfg, progress["epoch"])
    scst = 0 <= tcfg.self_critical_after <= progress["epoch"]
    bar = tqdm(total=n_batches, initial=progress["batch"], desc=f"epoch {progress['epoch']}", unit="batch",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    t0, caps = time.perf_counter(), 0
    objective = accelerator.unwrap_model(model)
    for batch in batches:
        objective.log_greedy = (progress["step"] + 1) % tcfg.log_every == 0  # the stats of a logged step
        features = batch["features"].to(accelerator.device, non_blocking=True)  # grids, or images when fine-tuning
        tokens = batch["tokens"].to(accelerator.device, non_blocking=True)
        targets = batch["targets"].to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                total, norm, stats = model(features, tokens, targets, ss_prob=p_ss, refs=batch["refs"],
                                           keys=batch["keys"], scst=scst)
            # Normalizer (tokens, or sampled captions) over every process: each weighs the same however
            # the batch was split. DDP averages gradients over processes, hence the x world.
            global_norm = accelerator.reduce(norm.detach().float().reshape(1), reduction="sum")[0]
            loss = total * accelerator.num_processes / global_norm
            if not torch.isfinite(loss):
                raise TrainError(f"loss is {loss.item()} at step {progress['step']} (epoch {progress['epoch']}); "
                                 "lower --learning_rate, check the features with `python -m shards verify`")
            accelerator.backward(loss)
            if accelerator.sync_gradients and tcfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        progress["batch"] += 1
        progress["batches_total"] = progress.get("batches_total", 0) + 1
        caps += tokens.shape[0]
        bar.update(1)
        if accelerator.sync_gradients:
            progress["step"] += 1
            if progress["step"] % tcfg.log_every == 0:
                rate = caps * accelerator.num_processes / (time.perf_counter() - t0)
                row = {"step": progress["step"], "epoch": progress["epoch"], "loss": loss.item() / accelerator.num_processes,
                       "lr": scheduler.get_last_lr()[0], "ss_prob": p_ss, "captions_per_s": rate}
                for k, v in stats.items():  # xent per token; SCST reward and greedy CIDEr-D; hard-attention baseline
                    v = accelerator.reduce(v.detach().float().reshape(1).to(accelerator.device), "sum")[0]
                    row[k] = (v / global_norm if k == "xent" else v / accelerator.num_processes).item()
                bar.set_postfix(loss=f"{row['loss']:.3f}", cap_s=f"{rate:.0f}")
                log(row)
                t0, caps = time.perf_counter(), 0
            on_step()
            if tcfg.max_steps and progress["step"] >= tcfg.max_steps:
                bar.close()
                return False
    bar.close()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caption/train.py", description=__doc__.split("\n\n")[0])
    try:
        cfg, _ = C.parse(argv, parser, ("data", "model", "train"))
        return train(cfg)
    except (C.ConfigError, StoreError, TrainError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def train(cfg: C.Config) -> int:
    from accelerate.utils import set_seed

    tcfg = cfg.train
    run = C.run_dir(tcfg)
    run.mkdir(parents=True, exist_ok=True)
    accelerator = build_accelerator(tcfg, run)
    train_manifest = load_manifest(features_dir(cfg, "train"))
    cfg = with_split_file(cfg, train_manifest, accelerator)
    check_features(cfg, run, train_manifest, tcfg.resume, accelerator.is_main_process)  # fail now, not at the first validation
    vocab = build_vocab(cfg, run, accelerator)
    set_seed(tcfg.seed)  # before the model's random init
    decoder, cfg = build_model(cfg, vocab, train_manifest)
    state_dir = resume_dir(run) if tcfg.resume else None
    if tcfg.resume and state_dir is None:
        raise TrainError(f"{run}: --resume but no saved state (state/progress.json) there")
    if not tcfg.resume and (run / "state").exists():
        raise TrainError(f"{run}: holds a run already; pass --resume to continue it or choose another --checkpoint_path/--id")
    if tcfg.resume:
        saved = C.load(run / "config.yaml")
        if saved.model != cfg.model:
            raise TrainError(f"{run / 'config.yaml'}: model settings differ from this command's; resume with the same model")
    net = build_net(decoder, cfg, vocab, train_manifest)
    if accelerator.is_main_process:
        C.save(cfg, run / "config.yaml")  # the resolved config, before the first step

    world, rank = accelerator.num_processes, accelerator.process_index
    n_per_epoch = train_manifest["count"] // (tcfg.batch_size * world)
    if n_per_epoch == 0:
        raise TrainError(f"{features_dir(cfg, 'train')}: {train_manifest['count']} images cannot fill a batch of "
                         f"{tcfg.batch_size} on {world} process(es)")
    steps_per_epoch = max(1, n_per_epoch // tcfg.gradient_accumulation_steps)
    optimizer = build_optimizer(net, tcfg)
    model = Objective(net, vocab, tcfg.alpha_c, tcfg.seq_per_img)
    if tcfg.self_critical_after >= 0:
        from caption.scst import CiderD
        model.cider = CiderD(train_references(cfg))  # document frequencies of the training references, once
        model.scst_cfg = {"sample_n": tcfg.sc_sample_n, "baseline": tcfg.sc_baseline, "max_length": tcfg.max_length}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, steps_per_epoch))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # The scheduler steps once per optimizer step on every process (not once per process).
    scheduler.split_batches = True

    progress = {"epoch": 0, "batch": 0, "step": 0, "best": -math.inf, "best_step": -1}
    metrics_path = run / "metrics.jsonl"
    if state_dir is not None:
        accelerator.load_state(str(state_dir))  # weights_only loads inside Accelerate
        progress = json.loads((state_dir / "progress.json").read_text())
        progress["best"] = -math.inf if progress["best"] is None else progress["best"]  # null: nothing validated yet
        if progress["batch"] >= n_per_epoch:
            progress["epoch"], progress["batch"] = progress["epoch"] + 1, 0
    if accelerator.is_main_process:  # a killed run logged steps this one will log again (all of them, starting over)
        drop_rows_after(metrics_path, progress["step"])
    if accelerator.is_main_process:
        print(f"{run}: {world} process(es) on {accelerator.device}, {n_per_epoch} batches of {tcfg.batch_size} images "
              f"x {tcfg.seq_per_img} captions per epoch per process ({train_manifest['backend']} features)", flush=True)
    seen_before = progress.get("batches_total", 0)
    accelerator.init_trackers("caption", config={k: v for k, v in C.to_dict(cfg)["train"].items()
                                                 if isinstance(v, (int, float, str, bool))})

    def log(row: dict) -> None:
        accelerator.log({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=row["step"])
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    val_entries: list = []  # the val split's images, read once: Karpathy's whole file is parsed to get them

    def evaluate_and_save() -> None:
        if not val_entries:
            val_entries.extend(load_split(cfg.data.input_json, "val", cfg.data.restval_in_train))
        scores = validate(accelerator, model, vocab, cfg, entries=val_entries)
        if accelerator.is_main_process:
            log({"step": progress["step"], "epoch": progress["epoch"], **{f"val_{k}": v for k, v in scores.items()}})
            tqdm.write(f"step {progress['step']}: val CIDEr-D {scores['CIDEr']:.3f} BLEU-4 {scores['Bleu_4']:.3f}")
            if scores["CIDEr"] > progress["best"]:
                progress.update(best=scores["CIDEr"], best_step=progress["step"])
                save_weights(accelerator.unwrap_model(model).net, run / "best.safetensors")
        progress["best"] = broadcast_float(accelerator, progress["best"])
        progress["validated_step"] = progress["step"]
        save_checkpoint(accelerator, model, run, progress)

    def on_step() -> None:
        if tcfg.finetune:
            accelerator.unwrap_model(model).net.backbone_trains = progress["step"] >= tcfg.finetune_start
        if tcfg.save_checkpoint_every and progress["step"] % tcfg.save_checkpoint_every == 0:
            evaluate_and_save()

    interrupted = False
    try:
        if tcfg.finetune and progress["step"] == 0 and state_dir is None:
            evaluate_and_save()  # step 0: the cached run's decoder on grids from the same backbone
        while progress["epoch"] < tcfg.max_epochs:
            batches = make_batches(cfg, vocab, progress, rank, world, accelerator.device.type == "cuda")
            finished = train_one_epoch(accelerator, model, optimizer, scheduler, batches, n_per_epoch, vocab, cfg,
                                       progress, log, on_step)
            if not finished:
                break
            progress["epoch"], progress["batch"] = progress["epoch"] + 1, 0
            if not tcfg.save_checkpoint_every:
                evaluate_and_save()
    except KeyboardInterrupt:
        interrupted = True
        if accelerator.is_main_process:
            tqdm.write("interrupted: saving `last` before exiting")
    if interrupted:
        save_checkpoint(accelerator, model, run, progress)
    elif progress.get("validated_step") != progress["step"]:
        evaluate_and_save()
    accelerator.end_training()
    # One write per line: the ranks share a terminal (or a pipe) and must not interleave mid-line.
    sys.stdout.write(f"rank {rank}/{world}: {progress.get('batches_total', 0) - seen_before} batches this run\n")
    sys.stdout.flush()
    if accelerator.is_main_process:
        print(f"{run}: {progress['step']} steps; best val CIDEr-D {progress['best']:.3f} at step {progress['best_step']}")
    return 130 if interrupted else 0


def with_split_file(cfg: C.Config, manifest: dict, accelerator) -> C.Config:
    """The config with the split file the train features were made from, when the configured one
    does not exist: the manifest records it (and the image root), so training needs only --features."""
    if Path(cfg.data.input_json).is_file() or not manifest.get("input_json") or not Path(manifest["input_json"]).is_file():
        return cfg
    if accelerator.is_main_process:
        print(f"{cfg.data.input_json or '(no --input_json)'}: not a file; using the split file the train features were "
              f"made from, {manifest['input_json']}", flush=True)
    data = dataclasses.replace(cfg.data, input_json=manifest["input_json"],
                               images_root=cfg.data.images_root or manifest.get("images_root", ""))
    return dataclasses.replace(cfg, data=data)


def check_features(cfg: C.Config, run: Path, train_manifest: dict, resume: bool, is_main: bool = True) -> None:
    """Train and val features from one encoder (and, resuming, the one the run started on); every
    record an image of its split in the split file (none smuggled in). Records the encoder in
    RUN/features.json, which evaluation checks its features against."""
    want = identity(train_manifest)
    saved = run / "features.json"
    if resume and saved.exists():
        check_same_features(train_manifest, read_json(saved, "features identity"), str(features_dir(cfg, "train")),
                            f"the run's ({saved})")
    val_manifest = load_manifest(features_dir(cfg, "val"))
    check_same_features(val_manifest, want, str(features_dir(cfg, "val")), f"the train features ({features_dir(cfg, 'train')})")
    entries = load_split(cfg.data.input_json, "all")  # the split file parsed once for both splits
    for split in ("train", "val"):
        names = expand_split(split, cfg.data.restval_in_train)
        ids = {e.image_id for e in entries if e.split in names}
        bad = foreign_records(open_store(features_dir(cfg, split)).records, ids)
        if bad:
            raise TrainError(f"{features_dir(cfg, split)}: {len(bad)} record(s) are not images of split {split!r} in "
                             f"{cfg.data.input_json} (first: {bad[0]['key']}); featurize from the same split file")
    if is_main:
        atomic_write_json(saved, want)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step` (rewritten atomically)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def train_references(cfg: C.Config) -> list[list[list[str]]]:
    """Every training image's reference token lists (the CIDEr-D document frequencies come from these)."""
    return [r["captions"] for r in open_store(features_dir(cfg, "train")).records]


def make_batches(cfg: C.Config, vocab: Vocab, progress: dict, rank: int, world: int, pin: bool):
    """This epoch's batches from `progress["batch"]` on: cached grids, or images when fine-tuning."""
    tcfg = cfg.train
    common = dict(batch_size=tcfg.batch_size, seq_per_img=tcfg.seq_per_img, max_length=tcfg.max_length, seed=tcfg.seed,
                  epoch=progress["epoch"], rank=rank, world=world, num_workers=tcfg.num_workers, start=progress["batch"],
                  pin_memory=pin)
    if tcfg.finetune:
        from caption.finetune import image_batches
        store = open_store(features_dir(cfg, "train"))
        keys = {r["key"] for r in store.records}  # the images the cached run trained on (no failures, --limit)
        entries = [e for e in load_split(cfg.data.input_json, "train", cfg.data.restval_in_train) if e.key in keys]
        return image_batches(entries, C.images_root(cfg.data), int(store.manifest["image_size"]), vocab, **common)[1]
    return train_batches(features_dir(cfg, "train"), vocab, shuffle_buffer=tcfg.shuffle_buffer, **common)[1]


def broadcast_float(accelerator, value: float) -> float:
    """The main process's value on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(broadcast(t, from_process=0).item())


if __name__ == "__main__":
    raise SystemExit(main())
