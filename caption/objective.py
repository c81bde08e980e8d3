"""What one training step computes. DDP wraps one `TrainStep` (the model and the run's
objectives) and so sees exactly one forward per step.

The objectives, each a class with only its own settings, chosen in caption/train.py's `setup`:
  CrossEntropy   summed over non-pad tokens + alpha_c * the doubly stochastic regularizer (Eq. 14);
  HardAttention  the same, plus REINFORCE for the sampled locations with a moving-average
                 baseline of the caption log-likelihood and an entropy bonus (Sec. 4.1, Eq. 12);
  SelfCritical   policy gradient with a CIDEr-D reward (caption/scst.py), from `self_critical_after`.
Each returns (summed loss, normalizer, stats): the loop divides by the normalizer summed over
processes, so every token (or caption, `loss_per`) weighs the same however a batch is split.
stats["tokens"] is the batch's word count (the logged cross entropy is per token either way).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from caption.model import Forced, sequence_loss
from caption.scst import CiderD, reward_references, scst_loss
from caption.vocab import Vocab


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over every process's values (each process's module sees only its share)."""
    if not _distributed():
        return x.mean()
    both = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype)])
    torch.distributed.all_reduce(both)
    return both[0] / both[1]


class TrainStep(nn.Module):
    """The module DDP wraps: the model (caption.encoder.Captioner) and the run's objectives by
    name; `use(name)` picks the one the next steps compute (the switch to self-critical)."""

    def __init__(self, net: nn.Module, objectives: dict[str, nn.Module]):
        super().__init__()
        self.net = net
        self.objectives = nn.ModuleDict(objectives)  # hard attention's baseline is saved with the state
        self.active = next(iter(objectives))

    def use(self, name: str) -> None:
        self.active = name

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, **step):
        """inputs: grids (B, g, g, D), or images (B, 3, P, P) when fine-tuning; tokens/targets
        (N = B*S, T); `step`: ss_prob, noise (the captions' own random numbers, caption/noise.py),
        refs and keys (self-critical), logged (a logged step)."""
        return self.objectives[self.active](self.net, inputs, tokens, targets, **step)


class CrossEntropy(nn.Module):
    """Teacher-forced cross entropy + alpha_c * the doubly stochastic regularizer (Eq. 14)."""

    def __init__(self, pad_id: int, alpha_c: float = 1.0, seq_per_img: int = 5, per: str = "token"):
        super().__init__()
        self.pad_id, self.alpha_c, self.seq_per_img, self.per = pad_id, alpha_c, seq_per_img, per

    def forward(self, net, inputs, tokens, targets, ss_prob: float = 0.0, noise=None, **_):
        out = net(inputs, tokens, seq_per_img=self.seq_per_img, ss_prob=ss_prob, noise=noise)
        total, xent, ntok = sequence_loss(out.logits, targets, out.alphas, self.pad_id, self.alpha_c)
        stats = {"xent": xent.detach(), "attention_reg": (total - xent).detach(), "tokens": ntok.detach()}  # summed
        extra = self.extra(out, targets, stats)
        norm = ntok if self.per == "token" else torch.tensor(targets.shape[0], device=targets.device)
        return (total if extra is None else total + extra), norm, stats

    def extra(self, out: Forced, targets: torch.Tensor, stats: dict) -> torch.Tensor | None:
        """Terms a subclass adds to the loss (None: none)."""
        return None


class HardAttention(CrossEntropy):
    """Stochastic hard attention's objective (Sec. 4.1): the cross entropy and regularizer of the
    sampled (or, semi-sampling, the expected) contexts plus `terms`."""

    def __init__(self, pad_id: int, alpha_c: float = 1.0, seq_per_img: int = 5, entropy_weight: float = 0.002,
                 baseline_decay: float = 0.9, world: int = 1, per: str = "token"):
        super().__init__(pad_id, alpha_c, seq_per_img, per)
        self.entropy_weight, self.baseline_decay = entropy_weight, baseline_decay
        self.world = world  # processes: the terms weigh the global batch's captions
        self.register_buffer("baseline", torch.zeros(()))  # moving average of the per-step NLL

    def extra(self, out: Forced, targets: torch.Tensor, stats: dict) -> torch.Tensor | None:
        if not self.training or out.hard_logp is None:
            return None
        return self.terms(out, targets, stats)

    def terms(self, out: Forced, targets: torch.Tensor, stats: dict) -> torch.Tensor:
        """REINFORCE for the sampled locations and the entropy term, weighted as capgen.py (RL_sumCost):

            J = mean_n NLL_n + sum_{t,n} (c_n - b) / 10 * log p(s_tn | a) + lambda_e * sum_{t,n,l} alpha log alpha

        with c_n caption n's NLL divided by its own length (capgen's batches hold captions of one
        length, homogeneous_data.py, so its batch length is each caption's), b the moving average
        of that per-step NLL over the global batch (`baseline_time`; every process averages all
        processes' captions), the REINFORCE sum over the captions that sampled, the entropy over
        all. The loop divides our summed loss by the global batch's tokens, where capgen.py
        averages over captions: these terms are returned x the global batch's captions, so that
        their weight against the cross entropy is the authors' on any number of processes (and
        with `loss_per caption` the loss is capgen's J itself).
        Padding steps are left out.
        """
        N = targets.shape[0]
        mask = (targets != self.pad_id).float()  # (N, T)
        nll = nn.functional.cross_entropy(out.logits.float().transpose(1, 2), targets, reduction="none")  # (N, T)
        c = ((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).detach()  # (N,) per-step NLL over the caption's own length
        sampled = out.hard_mask.float()  # (N,) the captions that sampled locations
        logp_s = (out.hard_logp * mask).sum(1)  # (N,) log p(s | a)
        reinforce = ((c - self.baseline) / 10.0 * sampled * logp_s).sum()
        alphas = out.alphas.float()
        neg_entropy = (alphas * alphas.clamp_min(1e-12).log()).sum(-1)  # (N, T) sum_l alpha log alpha
        neg_entropy = (neg_entropy * mask).sum()
        with torch.no_grad():  # the authors' baseline_time: 0.9 b + 0.1 mean per-step NLL of the global batch
            self.baseline.mul_(self.baseline_decay).add_((1 - self.baseline_decay) * global_mean(c))
        stats["hard_baseline"] = self.baseline.detach().clone()
        # x the global batch's captions: the loop divides by the global token count (and DDP averages over processes)
        return N * self.world * (reinforce + self.entropy_weight * neg_entropy)


class SelfCritical(nn.Module):
    """Self-critical sequence training (Rennie et al. 2017): `sample_n` sampled captions per image,
    rewarded by CIDEr-D against the image's references (`cider` holds the training references'
    document frequencies), with the greedy caption or the other samples' mean as baseline."""

    def __init__(self, cider: CiderD, vocab: Vocab, sample_n: int = 5, baseline: str = "mean", max_length: int = 16,
                 labels: bool = True, eos: bool = True, per: str = "token"):
        super().__init__()
        self.per = per  # token: self-critical.pytorch's RewardCriterion (mean over the sampled words and <eos>)
        self.cider, self.vocab, self.sample_n, self.baseline, self.max_length = cider, vocab, sample_n, baseline, max_length
        self.labels, self.eos = labels, eos  # how references and captions are read by the reward

    def forward(self, net, inputs, tokens, targets, refs=None, keys=None, logged: bool = True, noise=None, **_):
        features = net.encode(inputs)
        refs = [reward_references(r, self.vocab, self.max_length, self.labels, self.eos) for r in refs]
        total, counts, stats = scst_loss(net.decoder, features, refs, keys, self.vocab, self.cider, self.sample_n,
                                         self.baseline, self.max_length, log_greedy=logged, eos=self.eos, noise=noise)
        return total, counts[self.per], {k: torch.tensor(v) for k, v in stats.items()}
