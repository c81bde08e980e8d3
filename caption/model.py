"""Show, Attend and Tell (Xu et al. 2015, arXiv 1502.03044): soft attention LSTM decoder.

Letters used in shape comments, each with one meaning: B images; G rows per image (S
captions in training, K beams in decoding); R = B*G rows; N = B*S captions; L = 196
annotation vectors (a 14x14 grid g x g); D feature channels (2048 for ResNet-101 layer4);
T caption steps; V vocabulary; E embedding; H hidden; A attention.
Equation numbers refer to the arXiv v3 paper; the paper's formula is written out in
`Attention.forward` (faster float32 forms of it: caption/kernels.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from caption import kernels
from caption.noise import COIN, DROP_H, DROP_INIT, DROP_OUT, HARD_LOCATION, SS_SAMPLE, SS_USE, RowNoise, categorical, dropout
from caption.vocab import BOS, SPECIALS
from common.config import DecoderConfig


State = dict[str, torch.Tensor]


PER_IMAGE = ("features", "keys")  # state entries held once per image, shared by its G rows (captions or beams)


class Attention(nn.Module):
    """f_att (Eq. 4-5): e_ti = w^T tanh(W_a a_i + b + W_h h_{t-1}) + b_w, alpha_t = softmax(e_t)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attn_dim: int, layers: int = 1, word_dim: int = 0):
        super().__init__()
        self.key = nn.Linear(feature_dim, attn_dim)  # W_a a_i + b: once per image
        if layers == 2:  # the authors' n_layers_att=2 (capgen.py:356-362): tanh(W' (W_a a_i + b) + b')
            self.key = nn.Sequential(nn.Linear(feature_dim, attn_dim), nn.Linear(attn_dim, attn_dim), nn.Tanh())
        self.query = nn.Linear(hidden_dim, attn_dim, bias=False)  # W_h h_{t-1}: every step
        # attention_query state_word: + W_y E y_{t-1}, the word just read (not in the paper's Eq. 4)
        self.query_word = nn.Linear(word_dim, attn_dim, bias=False) if word_dim else None
        self.score = nn.Linear(attn_dim, 1)  # w, b_w

    def keys(self, features: torch.Tensor) -> torch.Tensor:
        """W_a a_i + b, the per-image half of Eq. 4: (B, L, D) -> (B, L, A)."""
        return self.key(features)

    def forward(self, keys: torch.Tensor, h: torch.Tensor, word: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_t (R, L) from per-image keys (B, L, A) and h_{t-1} (R = B*G, H) of G rows per image
        (and with `query_word`, E y_{t-1} (R, E))."""
        B, L, A = keys.shape
        q = self.query(h)  # W_h h_{t-1}: (R, A)
        if self.query_word is not None:
            q = q + self.query_word(word.to(q.dtype))
        q = q.view(B, -1, 1, A)  # (R, A) -> (B, G, 1, A)
        if kernels.applies(keys, q):  # float32: the same value, faster (caption/kernels.py)
            e = kernels.tanh_scores(keys, q, self.score)
        else:
            e = self.score(torch.tanh(keys[:, None] + q)).squeeze(-1)  # Eq. 4: (B, G, L, A) -> (B, G, L)
        return e.view(-1, L).float().softmax(dim=-1)  # Eq. 5: (B, G, L) -> (R, L), in float32


class Decoder(nn.Module):
    """The LSTM decoder of Sec. 3.1.2 with soft (or hard) attention over L annotation vectors."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.feature_dim <= 0:
            raise ValueError("DecoderConfig needs vocab_size and feature_dim (from vocab.json and the features manifest)")
        if cfg.attention not in ("soft", "hard"):
            raise ValueError(f"attention must be soft or hard, not {cfg.attention!r}")
        self.cfg = cfg
        D, E, Hd = cfg.feature_dim, cfg.embed_dim, cfg.hidden_dim
        # E y_{t-1}; y_0 is <bos> (id 1): learned, or with first_input zero the zero vector capgen feeds
        self.embed = nn.Embedding(cfg.vocab_size, E, padding_idx=BOS_ID if cfg.first_input == "zero" else None)
        # h0, c0 = f_init,h(mean a), f_init,c(mean a): two MLPs (Sec. 3.1.2, last paragraph).
        if cfg.init == "authors":  # capgen.py, n_layers_init=2: a shared ReLU layer, then tanh(W .) each
            self.init_shared = nn.Sequential(nn.Linear(D, D), nn.ReLU())
            self.init_h = nn.Sequential(nn.Linear(D, Hd), nn.Tanh())
            self.init_c = nn.Sequential(nn.Linear(D, Hd), nn.Tanh())
        else:
            self.init_shared = nn.Identity()
            self.init_h = nn.Sequential(nn.Linear(D, Hd), nn.Tanh(), nn.Linear(Hd, Hd))
            self.init_c = nn.Sequential(nn.Linear(D, Hd), nn.Tanh(), nn.Linear(Hd, Hd))
        self.attention = Attention(D, Hd, cfg.attn_dim, cfg.attn_layers, E if cfg.attention_query == "state_word" else 0)
        self.f_beta = nn.Linear(Hd, 1)  # gating scalar beta_t = sigmoid(f_beta(h_{t-1})) (Sec. 4.2.1)
        self.lstm = nn.LSTMCell(E + D, Hd)  # Eq. 1-3 over [E y_{t-1}, z_t]
        # Deep output layer (Eq. 7): p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)).
        self.L_h = nn.Linear(Hd, E)
        self.L_z = nn.Linear(D, E)
        self.L_o = nn.Linear(E, cfg.vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.weight_init == "authors":
            authors_init(self)

    # ---- decoding interface: init_state once per image, then step -------------------
    def init_state(self, features: torch.Tensor, noise: RowNoise | None = None) -> State:
        """Per-image state (one row per image: R = B); the attention keys W_a a_i are projected once here.

        Args:
            features: (B, L, D) annotation vectors, or (B, h, w, D) grids.
            noise: the batch's draws (training): `init: authors` drops out its shared layer with each
                image's own numbers.
        """
        if features.dim() == 4:
            features = features.flatten(1, 2)  # (B, h, w, D) -> (B, L, D)
        features = features.to(self.L_z.weight.dtype)
        mean = self.init_shared(features.mean(dim=1))  # (B, D)
        if self.cfg.init == "authors":  # capgen.py:628-631: dropout after the ReLU layer when training
            mean = dropout(mean, self.cfg.dropout, None if noise is None else noise.per_image_rows(1), self.training, DROP_INIT)
        return {
            "features": features,
            "keys": self.attention.keys(features),  # (B, L, A)
            "h": self._state_dtype(self.init_h(mean)),  # (B, H)
            "c": self._state_dtype(self.init_c(mean)),  # (B, H)
        }

    def _state_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """The recurrence's values (h, c, beta) in float32 under autocast (`fp32_recurrence`)."""
        return x.float() if self.cfg.fp32_recurrence else x

    def context(self, state: State, noise: RowNoise | None = None,
                word: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t = beta_t * sum_i alpha_ti a_i (Eq. 6, soft attention) (R, D) and alpha_t (R, L);
        `word`: E y_{t-1} (R, E), read by the query with attention_query state_word."""
        alpha = self.attention(state["keys"], state["h"], word)  # (R, L)
        if self.cfg.attention == "hard" and self.training and state.get("hard_mask") is not None:
            alpha_used = self._hard_alpha(alpha, state, noise)
        else:
            alpha_used = alpha
        feats = state["features"]  # (B, L, D), once per image
        B, L, D = feats.shape
        # All G rows of an image attend over the same grid: one (G, L) @ (L, D) product per image.
        weights = alpha_used.view(B, -1, L).to(feats.dtype)  # (B, G, L); under autocast bmm runs in bf16/fp16
        context = torch.bmm(weights, feats).view(-1, D)  # (B, G, L) @ (B, L, D) -> (B, G, D) -> (R, D)
        beta = torch.sigmoid(self._state_dtype(self.f_beta(state["h"])))  # (R, 1)
        if not self.cfg.fp32_recurrence:
            alpha = alpha.to(state["keys"].dtype)
        return beta * context, alpha

    def _hard_alpha(self, alpha: torch.Tensor, state: State, noise: RowNoise | None = None) -> torch.Tensor:
        """Stochastic hard attention (Eq. 8-9): a one-hot location s_t ~ Multinoulli(alpha).

        Rows whose `hard_mask` is False use the soft expectation instead (semi-sampling,
        Sec. 4.1). The chosen locations' log-probabilities are appended to state["hard_logp"].
        """
        idx = categorical(alpha.detach().float(), noise, HARD_LOCATION)[:, None]  # (R, 1)
        onehot = torch.zeros_like(alpha).scatter_(1, idx, 1.0)  # (R, L)
        logp = torch.log(alpha.gather(1, idx).squeeze(1).clamp_min(1e-12))  # (R,)
        state.setdefault("hard_logp", []).append(logp * state["hard_mask"])  # type: ignore[arg-type]
        mask = state["hard_mask"][:, None]  # (R, 1)
        return torch.where(mask, onehot, alpha)

    def output(self, emb: torch.Tensor, h: torch.Tensor, z: torch.Tensor, noise: RowNoise | None = None) -> torch.Tensor:
        """Deep output (Eq. 7) as in the authors' code: L_o(dropout(tanh(E y + L_h dropout(h) + L_z z))).
        `noise`: the dropout masks from each caption's own numbers (caption/noise.py)."""
        p = self.drop.p
        h = dropout(h, p, noise, self.training, DROP_H)
        return self.L_o(dropout(torch.tanh(emb + self.L_h(h) + self.L_z(z)), p, noise, self.training, DROP_OUT))

    def _advance(self, emb: torch.Tensor, state: State, noise: RowNoise | None = None) -> tuple[torch.Tensor, torch.Tensor, State]:
        z, alpha = self.context(state, noise, emb)
        h, c = self._lstm(torch.cat([emb, z], dim=-1), state["h"], state["c"])  # (R, E+D) -> (R, H)
        return z, alpha, {**state, "h": h, "c": c, "alpha": alpha}

    def _lstm(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1-3. Under autocast with `fp32_recurrence`, the gates' matrix products run in the
        autocast dtype and the cell update in float32 (nn.LSTMCell would round h and c to bf16
        at every step); otherwise nn.LSTMCell itself."""
        if not (self.cfg.fp32_recurrence and _autocast_on(x.device.type)):
            return self.lstm(x, (h, c))
        gates = (F.linear(x, self.lstm.weight_ih, self.lstm.bias_ih) + F.linear(h, self.lstm.weight_hh, self.lstm.bias_hh))
        i, f, g, o = gates.float().chunk(4, dim=1)  # (R, 4H) -> 4 x (R, H), float32
        c = torch.sigmoid(f) * c.float() + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def step(self, tokens: torch.Tensor, state: State, noise: RowNoise | None = None) -> tuple[torch.Tensor, State]:
        """One word: tokens (R,) of y_{t-1} -> log p(y_t) (R, V) and the next state (with its alpha);
        `noise`: this step's draws of each row (dropout in training, caption/noise.py)."""
        emb = self.embed(tokens)  # (R, E)
        z, _, state = self._advance(emb, state, noise)
        logits = self.output(emb, state["h"], z, noise)  # (R, V)
        return logits.float().log_softmax(dim=-1), state

    # ---- teacher forcing -------------------------------------------------------------
    def forward(self, features: torch.Tensor, tokens: torch.Tensor, seq_per_img: int = 1,
                ss_prob: float = 0.0, noise: RowNoise | None = None) -> "Forced":
        """Teacher-forced logits and attention for every caption, in the batch's order.

        Args:
            features: (B, L, D) or (B, h, w, D); each image's grid appears once.
            tokens: (N = B*S, T) inputs y_0..y_{T-1}, starting with <bos>, pad after the end.
            seq_per_img: S, captions per image; image b owns rows b*S .. b*S+S-1.
            ss_prob: scheduled sampling: probability of feeding the model's own sample.
            noise: each caption's own random numbers (dropout, sampled locations, coins), so that a
                caption trains alike on any number of processes; None: torch's global generator.

        Returns:
            Forced: logits (N, T, V), alphas (N, T, L), and in hard-attention training the sampled
            locations' log p(s_t | a) (N, T) and which captions sampled (N,).
        """
        state = expand_state(self.init_state(features, noise), seq_per_img)  # grid and keys stay once per image
        N, T = tokens.shape
        if self.cfg.attention == "hard" and self.training:
            # Semi-sampling (Sec. 4.1): locations are sampled with probability semi_sampling_p (else the
            # soft expectation), one coin per minibatch as capgen.py's h_sampling_mask, or per caption.
            if noise is None:
                coins = torch.rand(1 if self.cfg.semi_sampling == "batch" else N, device=tokens.device)
            elif self.cfg.semi_sampling == "batch":  # one coin for the global batch, the same on every process
                coins = torch.full((1,), noise.shared(COIN), device=tokens.device)
            else:
                coins = noise.uniform(COIN).to(tokens.device)  # (N,)
            state["hard_mask"] = (coins < self.cfg.semi_sampling_p).expand(N)
        emb = self.embed(tokens)  # (N, T, E)
        hs, zs, alphas, step_logits = [], [], [], []
        for t in range(T):
            emb_t = emb[:, t]
            noise_t = None if noise is None else noise.at(t)  # step t's draws
            if ss_prob > 0.0 and t > 0:
                use = (torch.rand(N, device=tokens.device) if noise is None else noise_t.uniform(SS_USE)) < ss_prob
                sample = categorical(step_logits[-1].detach().float().softmax(-1), noise_t, SS_SAMPLE)  # (N,)
                emb_t = torch.where(use[:, None], self.embed(sample), emb_t)
            z, alpha, state = self._advance(emb_t, state, noise_t)
            hs.append(state["h"])
            zs.append(z)
            alphas.append(alpha)
            if ss_prob > 0.0:
                step_logits.append(self.output(emb_t, state["h"], z, noise_t))
        if ss_prob > 0.0:
            logits = torch.stack(step_logits, dim=1)  # T x (N, V) -> (N, T, V)
        else:
            # The deep output for all T steps in one batched matmul.
            logits = self.output(emb, torch.stack(hs, dim=1), torch.stack(zs, dim=1), noise)  # (N, T, V)
        hard_logp = torch.stack(state["hard_logp"], dim=1) if state.get("hard_logp") else None  # T x (N,) -> (N, T)
        return Forced(logits, torch.stack(alphas, dim=1), hard_logp, state.get("hard_mask"))  # alphas T x (N, L) -> (N, T, L)


class Forced(NamedTuple):
    """A teacher-forced pass: what the objectives read."""
    logits: torch.Tensor  # (N, T, V)
    alphas: torch.Tensor  # (N, T, L)
    hard_logp: torch.Tensor | None = None  # (N, T): hard-attention training, log p(s_t | a) of the sampled locations
    hard_mask: torch.Tensor | None = None  # (N,): the captions that sampled locations (semi-sampling)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before 2.4: one flag per device kind
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


BOS_ID = SPECIALS.index(BOS)  # y_0's token id (caption/vocab.py: the specials come first)


@torch.no_grad()
def authors_init(model: nn.Module) -> None:
    """capgen.py's initial weights (norm_weight, ortho_weight: capgen.py:109-131, 174, 193-202, 523):
    a square matrix orthogonal, any other N(0, 0.01^2); the LSTM's recurrent matrix one orthogonal
    block per gate; biases zero. Embedding rows as norm_weight (n_words x dim_word: Gaussian); a
    zero y_0 row stays zero."""
    def norm_weight(w: torch.Tensor) -> None:
        if w.shape[0] == w.shape[1]:
            nn.init.orthogonal_(w)
        else:
            nn.init.normal_(w, std=0.01)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            norm_weight(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.01)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LSTMCell):
            H = m.hidden_size
            for k in range(4):  # gates i, f, g, o: capgen's W (nin x dim each) and U (ortho_weight(dim) each)
                norm_weight(m.weight_ih[k * H:(k + 1) * H])
                nn.init.orthogonal_(m.weight_hh[k * H:(k + 1) * H])
            nn.init.zeros_(m.bias_ih)
            nn.init.zeros_(m.bias_hh)


def expand_state(state: State, n: int) -> State:
    """n rows per current row (captions or beams of one image); per-image entries stay shared."""
    if n == 1:
        return dict(state)
    return {k: v.repeat_interleave(n, dim=0) if torch.is_tensor(v) and k not in PER_IMAGE else v
            for k, v in state.items()}


def select_state(state: State, index: torch.Tensor) -> State:
    """Reorder the per-row tensors (beam search's backpointers, which stay within an image)."""
    return {k: v.index_select(0, index) if torch.is_tensor(v) and k not in PER_IMAGE else v
            for k, v in state.items()}


def select_images(state: State, images: torch.Tensor, rows: torch.Tensor) -> State:
    """Keep some images: per-image entries by image index, per-row entries by row index."""
    return {k: (v.index_select(0, images) if k in PER_IMAGE else v.index_select(0, rows)) if torch.is_tensor(v) else v
            for k, v in state.items()}


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, alphas: torch.Tensor, pad_id: int,
                  alpha_c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross entropy over non-pad targets and the doubly stochastic regularizer.

    lambda * sum_i (1 - sum_t alpha_ti)^2 (Eq. 14), the sum over t running over real steps only.
    Returns (summed loss, summed xent, token count); the caller divides by the token count
    gathered across processes, so every token weighs the same however the batch is split.
    """
    mask = targets != pad_id  # (N, T)
    xent = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (N*T,)
    xent = (xent.view_as(targets) * mask).sum()
    reg = ((1.0 - (alphas.float() * mask[..., None]).sum(dim=1)) ** 2).sum()  # (N, T, L) -> (N, L) -> ()
    return xent + alpha_c * reg, xent, mask.sum()
