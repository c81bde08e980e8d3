"""A run folder, read and written: what training leaves and what evaluation, prediction and
fine-tuning load.

    RUN/config.yaml            the resolved config (every section), written before the first step
    RUN/vocab.json             the vocabulary (index -> word)
    RUN/features.json          the identity of the encoder the run trained on (shards.manifest.IDENTITY)
    RUN/best.safetensors       decoder weights of the best validation CIDEr-D; last.safetensors: the latest
    RUN/backbone.safetensors   fine-tuned runs: the backbone beside best (backbone_last beside last)
    RUN/state/                 Accelerate's resume state (optimizer, scheduler, RNG) + progress.json
    RUN/metrics.jsonl          one JSON row per logged step and per validation
    RUN/encoder.json           exported runs only (caption/export.py): the encoder, in place of the features folder
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from caption.model import Decoder
from caption.vocab import Vocab
from common import config as C
from common.errors import UserError
from common.files import atomic_write_json, read_json, regular_file, save_tensors
from shards import load_manifest, location
from shards.manifest import check_encoder_fields, identity
from shards.remote import join


class RunError(UserError):
    """A run folder that cannot be used as asked: missing checkpoint, mismatched vocabulary or features."""


def features_dir(cfg: C.Config, split: str) -> Path | str:
    """The features folder of one split (or its URL, for a store served over http)."""
    root = location(cfg.data.features)
    return join(root, split) if isinstance(root, str) else root / split


def check_compatible(run: Path, cfg: C.Config, vocab: Vocab, weights: dict) -> None:
    """A checkpoint must match the vocabulary and the features' channels."""
    emb = weights.get("embed.weight")
    if emb is not None and emb.shape[0] != len(vocab):
        raise RunError(f"{run}: checkpoint has a {emb.shape[0]}-word vocabulary, vocab.json has {len(vocab)}")
    lz = weights.get("L_z.weight")
    if lz is not None and lz.shape[1] != cfg.model.feature_dim:
        raise RunError(f"{run}: checkpoint expects {lz.shape[1]}-channel features, {cfg.data.features} has {cfg.model.feature_dim}")


def load_weights(run: str | Path, which: str = "best") -> dict[str, torch.Tensor]:
    """RUN/{which}.safetensors (no pickle), every tensor finite, or a RunError saying what is wrong:
    missing (train first), not a regular file (a FIFO would block), not safetensors, NaN or inf."""
    path = Path(run) / f"{which}.safetensors"
    if not path.exists() and not path.is_symlink():
        raise RunError(f"{path}: no such checkpoint (train first, or pick --checkpoint best|last)")
    regular_file(path, "weights file", RunError)
    try:
        weights = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds; one line for the user
        raise RunError(f"{path}: not a safetensors weights file ({type(e).__name__}: {e})") from None
    for name, w in weights.items():
        if w.is_floating_point() and not torch.isfinite(w).all():
            raise RunError(f"{path}: tensor {name} holds NaN or inf: the weights are broken (a diverged run?)")
    return weights


def load_into(model: torch.nn.Module, weights: dict, where: str | Path) -> None:
    """load_state_dict, with a mismatch (another model size, attention or init) as one line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise RunError(f"{where}: these weights do not fit the model its config.yaml describes ({lines[1] if len(lines) > 1 else lines[0]})") from None


def load_decoder(run: str | Path, which: str = "best", device: str | torch.device = "cpu") -> tuple[Decoder, Vocab, C.Config]:
    """A trained decoder from a run folder: config.yaml, vocab.json and {which}.safetensors."""
    run = Path(run)
    cfg = C.load(run / "config.yaml")
    vocab = Vocab.load(run / "vocab.json")
    weights = load_weights(run, which)
    check_compatible(run, cfg, vocab, weights)
    model = Decoder(cfg.model)
    load_into(model, weights, run / f"{which}.safetensors")
    return model.to(device).eval(), vocab, cfg


def save_weights(net: torch.nn.Module, path: Path) -> None:  # net: caption.encoder.Captioner
    """Decoder weights as safetensors, replaced atomically; a Captioner's encoder writes what it
    learned beside them (a fine-tuned backbone: best -> backbone.safetensors, last -> backbone_last)."""
    net.encoder.save_beside(path)
    net = net.decoder
    save_tensors({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, path, metadata={"format": "pt"})


def run_features(run: str | Path, cfg: C.Config) -> tuple[dict, str]:
    """(identity, description) of the encoder a run was trained on, for `check_same_features`:
    RUN/features.json, or for runs from before it, the run's train features' manifest."""
    saved = Path(run) / "features.json"
    if saved.exists():
        return read_json(saved, "features identity", RunError), f"the run's ({saved})"
    train = features_dir(cfg, "train")
    return identity(load_manifest(train)), f"the run's train features ({train})"


ENCODER = "encoder.json"  # an exported run's encoder: backbone, weights, preprocessing (caption/export.py)


def encoder_of(run: str | Path, cfg: C.Config) -> dict:
    """What made the run's grids, as a features manifest says it: RUN/encoder.json for an
    exported run, else the run's train features' manifest."""
    if (Path(run) / ENCODER).exists():
        m = read_json(Path(run) / ENCODER, "encoder description", RunError)
        if not isinstance(m, dict):
            raise RunError(f"{Path(run) / ENCODER}: not an encoder description (expected a JSON object)")
        for k in ("backbone", "layer", "weights", "grid", "image_size"):
            if k not in m:
                raise RunError(f"{Path(run) / ENCODER}: lacks {k!r}")
        return check_encoder_fields(m, Path(run) / ENCODER, RunError)
    return load_manifest(features_dir(cfg, "train"))


def record_features(run: Path, manifest: dict) -> None:
    """RUN/features.json: the train features' encoder, which evaluation checks its features against."""
    atomic_write_json(run / "features.json", identity(manifest))


# ---- resume state ------------------------------------------------------------------------
def resume_dir(run: Path) -> Path | None:
    """The newest complete resume state: state/, or state.old/ when a save was killed mid-swap."""
    for d in (run / "state", run / "state.old"):
        if (d / "progress.json").exists():
            return d
    return None


def save_state(accelerator, run: Path, progress: dict, net: torch.nn.Module) -> None:
    """`last`: decoder weights (safetensors) + Accelerate state + progress, replaced atomically.

    Every rank saves its own RNG state into state.tmp; then state.tmp becomes state (the old
    one kept as state.old until the swap is done, so a kill at any point leaves one whole state)."""
    tmp, final, old = run / "state.tmp", run / "state", run / "state.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # save_state has no barrier at its end
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(progress))
        save_weights(net, run / "last.safetensors")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_progress(state_dir: Path) -> dict:
    """progress.json of a resume state (written by `save_state`)."""
    return read_json(state_dir / "progress.json", "training progress", RunError)
