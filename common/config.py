"""One YAML per run, loaded into nested frozen dataclasses, overridable from the command line.

    cfg, ns = parse(["--config", "configs/shapes.yaml", "--batch_size", "10"], parser, ("data", "train"))
    cfg = load("runs/shapes/config.yaml")                  # a run's resolved config

The YAML has sections (`data`, `featurize`, `model`, `train`); a flag names a field by its
own name (`--batch_size`) when that name is unique among the sections a command uses, or
by `--section.field`. Unknown keys in the YAML or on the command line are errors. Help text
and valid values sit on the field (`_f(default, help, ge=..., choices=...)`).

Both stages import this module and nothing here imports them: the decoder's section
(`DecoderConfig`) is defined here and used by caption/model.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from common.errors import UserError
from common.files import atomic_write_text


class ConfigError(UserError):
    """A config that cannot be used; the message names the file or flag and the problem."""


def _f(default, help: str, **valid):  # noqa: A002 - the name dataclasses users expect
    """A field with its help text and its valid values: ge/gt/le/lt bounds, `choices`, or
    `not_zero` (e.g. -1 meaning "all", 0 meaningless); checked for YAML values and flags alike."""
    meta = {"help": help, **valid}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_value(value, valid: dict, where: str):
    """`value`, or a ConfigError naming `where` (the flag or YAML key) and what is allowed."""
    if "choices" in valid and value not in valid["choices"]:
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, valid['choices']))}, got {value!r}")
    bounds = [("ge", "at least", lambda v, b: v >= b), ("gt", "greater than", lambda v, b: v > b),
              ("le", "at most", lambda v, b: v <= b), ("lt", "less than", lambda v, b: v < b)]
    for key, words, ok in bounds:
        if key in valid and not ok(value, valid[key]):
            raise ConfigError(f"{where}: must be {words} {valid[key]}, got {value!r}")
    if valid.get("not_zero") and value == 0:
        raise ConfigError(f"{where}: must not be 0 ({valid.get('help', 'not zero')})")
    return value


def check_args(ns: argparse.Namespace, valid: dict[str, dict]) -> argparse.Namespace:
    """Plain argparse flags checked like config fields: {"beam_size": {"ge": 1}, ...}."""
    for name, v in valid.items():
        check_value(getattr(ns, name), v, f"--{name}")
    return ns


def _valid(section_type: type, name: str) -> dict:
    return dict(next(f.metadata for f in fields(section_type) if f.name == name))


@dataclass(frozen=True)
class DataConfig:
    input_json: str = _f("data/shapes/dataset.json", "Karpathy-format split file (dataset_coco.json)")
    images_root: str = _f("", "folder the split file's filepath/filename are relative to; default: the JSON's folder")
    features: str = _f("features/shapes", "features folder holding one subfolder per split")
    format: str = _f("zarr", "feature store backend: zarr or wds", choices=("zarr", "wds"))
    restval_in_train: bool = _f(True, "the train split also takes Karpathy's restval images")
    input_shards: str = _f("", "image-text tar shards in img2dataset's layout instead of a split file: paths or URLs "
                               "with brace expansion, e.g. 'http://host/cc3m/{00000..00331}.tar' or "
                               "'pipe:aws s3 cp s3://bucket/{00000..00331}.tar -'")
    shards_split: str = _f("train", "the split the input shards are", choices=("train", "val", "test"))
    url_timeout: float = _f(60.0, "seconds per connect and per read of a shard streamed over HTTP", gt=0, le=86_400)


@dataclass(frozen=True)
class FeaturizeConfig:
    backbone: str = _f("resnet101", "resnet18|resnet34|resnet50|resnet101|resnet152", choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"))
    layer: str = _f("layer4", "last ResNet stage kept: layer4 (stride 32) or layer3 (stride 16)", choices=("layer3", "layer4"))
    weights: str = _f("imagenet", "imagenet (torchvision's cache), none (random init, BatchNorm re-estimated) or a path")
    image_size: int = _f(448, "square input side; the grid is adaptive-pooled to grid x grid if it is not already", ge=32,
                          le=4096)
    grid: int = _f(14, "output grid side (14 gives L = 196 locations)", ge=1, le=64)
    batch_size: int = _f(32, "images per forward pass", ge=1)
    num_workers: int = _f(4, "DataLoader workers decoding and resizing images", ge=0)
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16", choices=("auto", "fp32", "fp16", "bf16"))
    decode: str = _f("workers", "workers (PIL in DataLoader workers) or device (JPEGs decoded on the model's device: nvjpeg on a GPU)", choices=("workers", "device"))
    decode_ahead: int = _f(2, "batches prepared ahead (decoded, resized, on the model's device) in a thread of their own, "
                                "overlapped with the forward pass; 0: on the main thread, between forward passes", ge=0)
    strict: bool = _f(False, "stop at the first image that cannot be decoded instead of recording it")
    limit: int = _f(0, "featurize only the first N images of the split (0: all)", ge=0)
    calibration_images: int = _f(256, "weights=none: images used to re-estimate BatchNorm statistics", ge=1)
    input_shard_samples: int = _f(10000, "input shards whose count cannot be known before reading (http(s) or "
                                         "pipe: without img2dataset's NNNNN_stats.json): the rows reserved for each, "
                                         "the most samples one holds (img2dataset's number_sample_per_shard)", ge=1,
                                 le=10_000_000)
    shard_images: int = _f(256, "zarr: images per shard file; wds: upper bound of images per tar", ge=1)
    shard_bytes: int = _f(300_000_000, "wds: target bytes per tar shard", ge=1)
    codec: str = _f("blosc-zstd", "zarr compression: blosc-zstd (byte shuffle + zstd-1, chosen by bench/store.py), zstd, lz4 or none", choices=("blosc-zstd", "zstd", "lz4", "none"))
    writer_threads: int = _f(0, "threads compressing and writing shards (0: one per CPU core, the cores shared by the processes "
                                "launched on this machine, at most 16)", ge=0)
    compile: bool = _f(False, "torch.compile the (BatchNorm-folded) backbone: tens of seconds once, then faster "
                              "forward passes; worth it for a large split")


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's dimensions and attention (caption/model.py); letters as in the paper."""
    vocab_size: int = _f(0, "V; set from the run's vocab.json", ge=0)
    feature_dim: int = _f(0, "D; set from the features manifest", ge=0)
    embed_dim: int = _f(512, "m in the paper: word embedding size", ge=1)
    hidden_dim: int = _f(512, "n in the paper: LSTM size", ge=1)
    attn_dim: int = _f(512, "attention MLP size", ge=1)
    attn_layers: int = _f(1, "layers on the annotation side of f_att: 1 (W_a a_i + b) or 2 (tanh(W' (W_a a_i + b) + b'), "
                             "the authors' COCO n_layers_att=2, capgen.py:356-362); computed once per image", ge=1, le=2)
    init: str = _f("mlp", "h0, c0 from mean(a): mlp (one tanh MLP each) or authors (n_layers_init=2: a shared ReLU layer "
                          "with dropout when training, then tanh(W .) for h0 and for c0; capgen.py:626-634)",
                   choices=("mlp", "authors"))
    first_input: str = _f("bos", "y_0, the first step's word input: bos (a learned <bos> embedding, as the seed and "
                                 "self-critical.pytorch) or zero (a zero vector, capgen.py:612-614's emb_shifted)",
                          choices=("bos", "zero"))
    weight_init: str = _f("pytorch", "initial weights: pytorch (each layer's default) or authors (capgen.py:109-131: "
                                     "0.01-scale Gaussians, orthogonal square matrices and LSTM recurrent blocks, "
                                     "zero biases)", choices=("pytorch", "authors"))
    attention_query: str = _f("state", "what f_att's query reads: state (h_{t-1}, the paper's Eq. 4: step t's attention "
                                       "is computed before the word y_{t-1} enters the LSTM) or state_word (h_{t-1} and "
                                       "E y_{t-1}: the second word of a pair, 'circle' after 'red', can look for the object "
                                       "the first one named; not the paper's, see docs/recipes.md)",
                                choices=("state", "state_word"))
    fp32_recurrence: bool = _f(True, "under autocast keep h, c, alpha, beta and the softmax in float32 (the big "
                                     "matrix products still run in bf16/fp16); false: the autocast dtype throughout")
    dropout: float = _f(0.5, "dropout before the deep output layer", ge=0, lt=1)
    attention: str = _f("soft", "soft (Sec. 4.2, deterministic) or hard (Sec. 4.1, stochastic)", choices=("soft", "hard"))
    semi_sampling_p: float = _f(0.5, "hard: probability that a training step SAMPLES locations (else it uses the soft "
                                     "expectation), as capgen.py's semi_sampling_p", ge=0, le=1)
    semi_sampling: str = _f("batch", "hard: one coin per minibatch (batch, capgen.py) or per caption (caption)",
                            choices=("batch", "caption"))


@dataclass(frozen=True)
class TrainConfig:
    id: str = _f("", "run name, appended to checkpoint_path when set")
    checkpoint_path: str = _f("runs/shapes", "run folder: config, vocab, checkpoints, logs")
    init_from: str = _f("", "start from this run's `best` decoder weights and vocabulary")
    resume: str = _f("false", "continue from the run folder's `last` state: true, false (a folder holding state is "
                              "an error), or auto (continue when the folder holds state, else start: for launchers "
                              "that restart workers, torchrun --max_restarts, SLURM --requeue)",
                     choices=("false", "true", "auto"), flag_const="true")
    seed: int = _f(123, "random seed", ge=0)
    batch_size: int = _f(10, "images per batch PER PROCESS (each brings seq_per_img captions): the global batch of "
                              "an optimizer step is batch_size x processes x gradient_accumulation_steps; see "
                              "global_batch_size", ge=1)
    global_batch_size: int = _f(0, "images per optimizer step over all processes (0: batch_size x processes x "
                                   "accumulation); when set, each process takes global / (processes x accumulation), "
                                   "which must divide, so every process count follows one trajectory", ge=0)
    scale_lr: bool = _f(False, "with global_batch_size 0: multiply learning_rate by processes x accumulation (the "
                               "linear scaling rule), since the global batch grows with them")
    seq_per_img: int = _f(5, "captions per image in a batch; the grid is read once for all", ge=1)
    max_epochs: int = _f(30, "epochs to train", ge=1)
    max_steps: int = _f(0, "stop after this many optimizer steps (0: no limit)", ge=0)
    learning_rate: float = _f(4e-4, "Adam learning rate", gt=0)
    learning_rate_decay_start: int = _f(-1, "epoch the step decay starts (-1: never)", ge=-1)
    learning_rate_decay_every: int = _f(3, "epochs between decays", ge=1)
    learning_rate_decay_rate: float = _f(0.8, "multiplier per decay", gt=0, le=1)
    optim_alpha: float = _f(0.9, "Adam beta1", ge=0, lt=1)
    optim_beta: float = _f(0.999, "Adam beta2", ge=0, lt=1)
    optim_epsilon: float = _f(1e-8, "Adam epsilon", gt=0)
    weight_decay: float = _f(0.0, "Adam weight decay", ge=0)
    grad_clip: float = _f(2.0, "clip the gradient to this (0: off): its global norm, or each value (grad_clip_mode)", ge=0)
    grad_clip_mode: str = _f("norm", "norm (the global norm, keeps the step's direction) or value (each gradient value "
                                     "clamped to +-grad_clip, as the seed and self-critical.pytorch: 0.1)",
                             choices=("norm", "value"))
    loss_per: str = _f("token", "the loss's normalizer over the global batch: token (every word weighs the same) or "
                                "caption (summed over each caption's words, averaged over captions: the seed's "
                                "LanguageModelCriterion, capgen's cost); self-critical: per token is "
                                "self-critical.pytorch's. Only the loss's scale changes (with Adam: through clipping)",
                       choices=("token", "caption"))
    alpha_c: float = _f(1.0, "lambda of the doubly stochastic attention regularizer (paper Eq. 14)", ge=0)
    entropy_weight: float = _f(0.002, "hard attention: lambda_e, the authors' alpha_entropy_c, on sum alpha log alpha",
                               ge=0)
    baseline_decay: float = _f(0.9, "hard attention: moving average of the per-step NLL (capgen.py's baseline_time)",
                               ge=0, le=1)
    max_length: int = _f(16, "captions are cut at this many words", ge=1)
    word_count_threshold: int = _f(5, "words seen this many times or fewer become <unk>", ge=0)
    count_splits: str = _f("train", "splits whose captions build the vocabulary: train or all", choices=("train", "all"))
    scheduled_sampling_start: int = _f(-1, "epoch scheduled sampling starts (-1: never)", ge=-1)
    scheduled_sampling_increase_every: int = _f(5, "epochs between increases", ge=1)
    scheduled_sampling_increase_prob: float = _f(0.05, "increase per step of the schedule", ge=0, le=1)
    scheduled_sampling_max_prob: float = _f(0.25, "ceiling of the sampling probability", ge=0, le=1)
    mixed_precision: str = _f("no", "no, bf16 or fp16 (the launcher's --mixed_precision wins when given)", choices=("no", "bf16", "fp16"))
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step", ge=1)
    num_workers: int = _f(2, "DataLoader workers", ge=0)
    shuffle_buffer: int = _f(1000, "wds: sample shuffle buffer", ge=0)
    features_in_memory: str = _f("off", "the train features held in memory for the run: off (streamed from the store "
                                        "each epoch), ram (pinned host memory), device (the GPU), or auto (device, else "
                                        "ram, else off, by the budget); every process holds the whole split (RAM: one "
                                        "copy per machine in /dev/shm) and takes the streamed batches",
                                 choices=("off", "ram", "device", "auto"))
    memory_budget_gb: float = _f(0.0, "what features_in_memory may take, in GB: of RAM per machine, of memory "
                                      "per GPU (0: 80% of the RAM available, at most /dev/shm's free space with "
                                      "several processes; 90% of the GPU's free memory)", ge=0)
    dist_timeout: float = _f(600.0, "seconds a collective waits for the other processes (nodes) before the run "
                                    "stops with an error instead of waiting for a lost node", gt=0, le=604_800)
    save_checkpoint_every: int = _f(500, "validate and checkpoint every this many steps (0: end of each epoch)", ge=0)
    save_every_minutes: float = _f(0.0, "also save `last` and the resume state (no validation) when this many minutes "
                                        "have passed since the last save: what a SIGKILL can lose (0: off)",
                                   ge=0, le=100_000)
    select_on: str = _f("cider", "the validation metric that picks best.safetensors and drives early stopping: cider "
                                 "(CIDEr-D of greedy captions, higher is better) or nll (mean per-token NLL of the "
                                 "val captions, lower is better: the authors' choice)", choices=("cider", "nll"))
    early_stop_patience: int = _f(0, "stop after this many validations in a row without a better select_on value "
                                     "(0: never; the authors: 10)", ge=0)
    early_stop_rule: str = _f("consecutive", "consecutive (patience validations in a row without a better value) or "
                                             "authors (capgen.py:1340-1353: from epoch patience + 1 on, a validation "
                                             "no better than the best before the last patience ones counts, a new "
                                             "best (ties included) resets the count, stop when it exceeds patience)",
                              choices=("consecutive", "authors"))
    val_images_use: int = _f(5000, "validation images scored (-1: all)", ge=-1, not_zero=True)
    log_every: int = _f(25, "steps between logged losses", ge=1)
    self_critical_after: int = _f(-1, "epoch to switch to self-critical training (-1: never)", ge=-1)
    sc_sample_n: int = _f(5, "SCST: samples per image; >1 uses their mean reward as baseline (new SC)", ge=1)
    sc_references: str = _f("labels", "SCST references (and CIDEr-D document frequencies): labels (the training "
                                      "captions as the model sees them: cut at max_length, words outside the "
                                      "vocabulary as <unk>, as self-critical.pytorch) or raw (the token lists as written)",
                            choices=("labels", "raw"))
    sc_eos: bool = _f(True, "SCST: <eos> ends every reference and every sampled caption that ended, and counts in the "
                            "document frequencies (self-critical.pytorch); it penalizes captions cut mid-phrase")
    sc_baseline: str = _f("mean", "SCST baseline: greedy (Rennie et al.) or mean of the other samples", choices=("greedy", "mean"))
    finetune: bool = _f(False, "train the backbone's upper blocks from images with the decoder")
    finetune_layers: list = _f(["layer4"], "backbone stages that train when finetune is on")
    cnn_learning_rate: float = _f(1e-5, "learning rate of the fine-tuned backbone blocks", ge=0)
    cnn_weight_decay: float = _f(0.0, "weight decay of the fine-tuned backbone blocks", ge=0)
    finetune_start: int = _f(0, "step from which the backbone trains (before it: frozen)", ge=0)
    freeze_bn: bool = _f(True, "keep BatchNorm statistics and affine weights frozen while fine-tuning")
    activation_checkpointing: bool = _f(False, "recompute backbone activations in backward to save memory")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    model: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = ("data", "featurize", "model", "train")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {s: hints[s] for s in SECTIONS}


def _coerce(value, typ, where: str):
    """YAML or command-line value -> the field's type, with a one-line error."""
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{where}: cannot parse {value!r}") from None
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, bool):  # YAML's true/false for a field that also takes words (resume: auto)
            return "true" if value else "false"
        return "" if value is None else str(value)
    if typ is list or origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


def _build(section_type: type, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, not a {type(values).__name__}")
    hints = typing.get_type_hints(section_type)
    known = {f.name for f in fields(section_type)}
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{where}: key {odd[0]!r} is not a name (known: {', '.join(sorted(known))})")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return section_type(**{k: check_value(_coerce(v, hints[k], f"{where}.{k}"), _valid(section_type, k), f"{where}.{k}")
                           for k, v in values.items()})


def from_dict(d: dict | None, where: str = "config") -> Config:
    """A Config from a nested dict (a parsed YAML); unknown sections or keys are errors."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(map(str, set(d) - set(SECTIONS)))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    d = moved(d)
    types_ = _section_types()
    return Config(**{s: _build(types_[s], d.get(s) or {}, f"{where}: {s}") for s in SECTIONS})


# Keys that moved between sections: older run folders' config.yaml (and users' YAMLs) still load.
MOVED = {("model", "entropy_weight"): "train", ("model", "baseline_decay"): "train"}


def moved(d: dict) -> dict:
    """`d` with keys that moved to another section put there (a value already there wins)."""
    d = {s: dict(v) if isinstance(v, dict) else v for s, v in d.items()}
    for (old, key), new in MOVED.items():
        if isinstance(d.get(old), dict) and key in d[old]:
            value = d[old].pop(key)
            if d.get(new) is None:
                d[new] = {}
            if isinstance(d[new], dict):
                d[new].setdefault(key, value)
    return d


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: malformed YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a YAML config (not UTF-8 text)") from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deep to read") from None


def add_override_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """Add `--field` (when unique among `sections`) and `--section.field` for every field."""
    types_ = _section_types()
    counts: dict[str, int] = {}
    for s in sections:
        for f in fields(types_[s]):
            counts[f.name] = counts.get(f.name, 0) + 1
    for s in sections:
        group = parser.add_argument_group(f"{s} (YAML section `{s}:`)")
        for f in fields(types_[s]):
            names = [f"--{s}.{f.name}"]
            if counts[f.name] == 1:
                names.insert(0, f"--{f.name}")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_ = (f.metadata.get("help", "") + f" (built-in: {shown if shown != '' else 'none'})").replace("%", "%%")
            if typing.get_type_hints(types_[s])[f.name] is bool or "flag_const" in f.metadata:  # `--resume` alone: true
                group.add_argument(*names, dest=f"{s}.{f.name}", default=None, nargs="?",
                                   const=f.metadata.get("flag_const", "true"),
                                   metavar="|".join(f.metadata.get("choices", ("true", "false"))), help=help_)
            else:
                group.add_argument(*names, dest=f"{s}.{f.name}", default=None, metavar=f.name.upper(), help=help_)


def apply_overrides(cfg: Config, ns: argparse.Namespace) -> Config:
    """Replace fields given on the command line (dest `section.field`), typed like the YAML."""
    types_ = _section_types()
    used = {d.split(".", 1)[0] for d in vars(ns) if "." in d}
    counts: dict[str, int] = {}
    for sec in used:
        for f in fields(types_[sec]):
            counts[f.name] = counts.get(f.name, 0) + 1
    updates: dict[str, dict] = {}
    for dest, value in vars(ns).items():
        if "." not in dest or value is None:
            continue
        s, name = dest.split(".", 1)
        hint = typing.get_type_hints(types_[s])[name]
        flag = f"--{name}" if counts.get(name) == 1 else f"--{s}.{name}"
        updates.setdefault(s, {})[name] = check_value(_coerce(value, hint, flag), _valid(types_[s], name), flag)
    return replace(cfg, **{s: replace(getattr(cfg, s), **u) for s, u in updates.items()})


# Flags named otherwise here: the seed's (congve1/image_caption_attention opts.py: --input_h5,
# --start_from, --hidden_size, --embedding_size, --drop_prob_lm, --losses_log_every,
# --language_eval, --use_selector, --load_best_score) and those of the code it follows
# (neuraltalk2, self-critical.pytorch: --input_fc_dir, --rnn_size, ...).
SEED_FLAGS = {
    "--hidden_size": "--hidden_dim", "--embedding_size": "--embed_dim",
    "--use_selector": "nothing: the gating scalar beta (Sec. 4.2.1) is always on",
    "--load_best_score": "--resume (the best value is kept in the run's state)",
    "--input_h5": "--features (a folder from `python -m featurize`)",
    "--input_fc_dir": "--features (a folder from `python -m featurize`)",
    "--input_att_dir": "--features (a folder from `python -m featurize`)",
    "--input_label_h5": "--input_json (captions come from the split file and the records)",
    "--start_from": "--resume (continue this run) or --init_from RUN (start from another run's weights)",
    "--rnn_size": "--hidden_dim", "--input_encoding_size": "--embed_dim", "--att_hid_size": "--attn_dim",
    "--drop_prob_lm": "--dropout", "--losses_log_every": "--log_every",
    "--language_eval": "python -m caption.evaluate (validation always scores CIDEr-D and BLEU-4)",
}


def obsolete_hint(unknown: list[str]) -> str:
    """'; --start_from is now --resume ...' for the seed's flags among `unknown`."""
    hints = [f"{u.split('=')[0]} is now {SEED_FLAGS[u.split('=')[0]]}" for u in unknown if u.split("=")[0] in SEED_FLAGS]
    return f"; {'; '.join(hints)}" if hints else ""


def parse(argv: list[str] | None, parser: argparse.ArgumentParser, sections: tuple[str, ...],
          default_config: str = "configs/shapes.yaml") -> tuple[Config, argparse.Namespace]:
    """Parse `--config` plus overrides; unknown flags are a ConfigError naming them."""
    parser.add_argument("--config", default=default_config, help="YAML config (default: %(default)s); its values "
                        "replace the built-in ones shown below, and flags replace both")
    add_override_flags(parser, sections)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown option(s): {' '.join(unknown)}{obsolete_hint(unknown)} (see --help)")
    cfg = from_dict(read_yaml(ns.config), where=str(ns.config))
    return apply_overrides(cfg, ns), ns


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (YAML) atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load(path: str | Path) -> Config:
    return from_dict(read_yaml(path), where=str(path))


def require_paths(cfg: Config, *names: str) -> Config:
    """`cfg`, or a ConfigError for the first of `names` ("data.features", "train.checkpoint_path")
    that is empty: "" would read and write the current folder."""
    for name in names:
        section, key = name.split(".")
        if not str(getattr(getattr(cfg, section), key)).strip():
            raise ConfigError(f"--{key}: empty; name the folder (or URL) it stands for")
    return cfg


def images_root(cfg: DataConfig) -> Path:
    """The image root: configured, or the split file's own folder."""
    return Path(cfg.images_root) if cfg.images_root else Path(cfg.input_json).parent


def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint_path) / cfg.id if cfg.id else Path(cfg.checkpoint_path)
