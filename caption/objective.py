"""What one training step computes, as a module: DDP then sees exactly one forward per step.

Three objectives over the same decoder (or fine-tuning Captioner):
  cross entropy   summed over non-pad tokens + lambda * the doubly stochastic regularizer (Eq. 14);
  hard attention  the same, plus REINFORCE for the sampled locations with a moving-average
                  baseline of the caption log-likelihood and an entropy bonus (Sec. 4.1, Eq. 12);
  self-critical   policy gradient with a CIDEr-D reward (caption/scst.py).
`forward` returns (summed loss, normalizer, stats): the loop divides by the normalizer summed
over processes, so every token (or sampled caption) weighs the same however a batch is split.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from caption.model import Decoder, sequence_loss
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


class Objective(nn.Module):
    """The training loss of `net` (a Decoder, or a Captioner: backbone + decoder when fine-tuning).

    `cider` (CiderD over the training references) and the `sc_*` settings are needed only for
    self-critical steps (`forward(..., scst=True)`)."""

    def __init__(self, net: nn.Module, vocab: Vocab, alpha_c: float = 1.0, seq_per_img: int = 5,
                 cider: CiderD | None = None, sc_sample_n: int = 5, sc_baseline: str = "mean", max_length: int = 16,
                 sc_labels: bool = True, sc_eos: bool = True, world: int = 1):
        super().__init__()
        self.world = world  # processes: the hard-attention terms weigh the global batch's captions
        self.net = net
        self.vocab, self.alpha_c, self.seq_per_img = vocab, alpha_c, seq_per_img
        self.cider, self.sc_sample_n, self.sc_baseline, self.max_length = cider, sc_sample_n, sc_baseline, max_length
        self.sc_labels, self.sc_eos = sc_labels, sc_eos  # how references and captions are read by the reward
        self.register_buffer("baseline", torch.zeros(()))  # hard attention: moving average of log p(y | a, s)

    @property
    def decoder(self) -> Decoder:
        return self.net.decoder if hasattr(self.net, "decoder") else self.net

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, ss_prob: float = 0.0,
                refs: list | None = None, keys: list | None = None, scst: bool = False, log_greedy: bool = True,
                noise=None):
        """(summed loss, normalizer, stats) of a batch: `inputs` are grids (B, g, g, D), or images
        (B, 3, S, S) when fine-tuning; tokens/targets (N = B*S, T). `log_greedy`: SCST measures the
        greedy captions' CIDEr-D this step (a logged step). `noise`: the captions' own random numbers
        (caption/noise.py)."""
        if scst:
            return self.self_critical(inputs, refs, keys, log_greedy)
        logits, alphas = self.net(inputs, tokens, seq_per_img=self.seq_per_img, ss_prob=ss_prob, noise=noise)
        total, xent, ntok = sequence_loss(logits, targets, alphas, self.vocab.pad_id, self.alpha_c)
        stats = {"xent": xent.detach(), "attention_reg": (total - xent).detach()}  # summed; per token when logged
        dec = self.decoder
        if dec.cfg.attention == "hard" and self.training and dec.hard_logp is not None:
            total = total + self.hard_attention_terms(logits, targets, alphas, stats)
        return total, ntok, stats

    def hard_attention_terms(self, logits, targets, alphas, stats) -> torch.Tensor:
        """REINFORCE for the sampled locations and the entropy term, weighted as capgen.py (RL_sumCost):

            J = mean_n NLL_n + sum_{t,n} (c_n - b) / 10 * log p(s_tn | a) + lambda_e * sum_{t,n,l} alpha log alpha

        with c_n caption n's NLL divided by its own length (capgen's batches hold captions of one
        length, homogeneous_data.py, so its batch length is each caption's), b the moving average
        of that per-step NLL over the global batch (`baseline_time`; every process averages all
        processes' captions), the REINFORCE sum over the captions that sampled, the entropy over
        all. The loop divides our summed loss by the global batch's tokens, where capgen.py
        averages over captions: these terms are returned x the global batch's captions, so that
        their weight against the cross entropy is the authors' on any number of processes.
        Padding steps are left out.
        """
        dec = self.decoder
        N = targets.shape[0]
        mask = (targets != self.vocab.pad_id).float()  # (N, T)
        nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (N, T)
        c = ((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).detach()  # (N,) per-step NLL over the caption's own length
        sampled = dec.hard_mask.float()  # (N,) the captions that sampled locations
        logp_s = (dec.hard_logp * mask).sum(1)  # (N,) log p(s | a)
        reinforce = ((c - self.baseline) / 10.0 * sampled * logp_s).sum()
        neg_entropy = (alphas.float() * alphas.float().clamp_min(1e-12).log()).sum(-1)  # (N, T) sum_l alpha log alpha
        neg_entropy = (neg_entropy * mask).sum()
        with torch.no_grad():  # the authors' baseline_time: 0.9 b + 0.1 mean per-step NLL of the global batch
            self.baseline.mul_(dec.cfg.baseline_decay).add_((1 - dec.cfg.baseline_decay) * global_mean(c))
        stats["hard_baseline"] = self.baseline.detach().clone()
        # x the global batch's captions: the loop divides by the global token count (and DDP averages over processes)
        return N * self.world * (reinforce + dec.cfg.entropy_weight * neg_entropy)

    def self_critical(self, inputs, refs, keys, log_greedy: bool):
        if self.cider is None:
            raise ValueError("self-critical steps need Objective(cider=CiderD(training references))")
        features = self.net.encode(inputs) if hasattr(self.net, "encode") else inputs
        refs = [reward_references(r, self.vocab, self.max_length, self.sc_labels, self.sc_eos) for r in refs]
        loss, stats = scst_loss(self.decoder, features, refs, keys, self.vocab, self.cider, self.sc_sample_n,
                                self.sc_baseline, self.max_length, log_greedy=log_greedy, eos=self.sc_eos)
        n = features.shape[0] * self.sc_sample_n
        return loss * n, torch.tensor(n, device=features.device), {k: torch.tensor(v) for k, v in stats.items()}
