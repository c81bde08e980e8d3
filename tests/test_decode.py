import itertools

import pytest
import torch

from caption.decode import beam_search, greedy, sample
from caption.model import Decoder, DecoderConfig

BOS, EOS = 1, 2


def table_step(seed, V=5, T=4, eos_bias=-2.0):
    """A hand-written step function: log p depends on the previous word and the position."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g) * 2
    table[:, EOS] += eos_bias
    table[:, BOS] = -1e9  # never emits <bos>
    pos = torch.randn(T + 1, V, generator=g)

    def step(tokens, state):
        t = state["t"]
        return (table[tokens] + pos[t]).log_softmax(-1), {"t": t + 1, "alpha": torch.ones(tokens.shape[0], 4) / 4}

    def logp(seq):
        s, prev = 0.0, BOS
        for t, w in enumerate(seq):
            s += (table[prev] + pos[t]).log_softmax(-1)[w].item()
            prev = w
        return s
    return step, logp


def exhaustive(logp, V, T, length_penalty=0.0):
    """The best (score, words) over every caption of up to T words; with a length penalty the
    score is log p / steps ** penalty, the closing <eos> counting as a step."""
    words = [w for w in range(V) if w not in (BOS, EOS)]
    best = (float("-inf"), None)
    for n in range(T + 1):
        for seq in itertools.product(words, repeat=n):
            s = logp(list(seq) + ([EOS] if n < T else []))
            if length_penalty:
                s /= float(n + 1 if n < T else T) ** length_penalty
            best = max(best, (s, seq), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("seed", range(12))
def test_large_beam_is_exhaustive_search(seed):
    V, T = 5, 4
    step, logp = table_step(seed, V, T)
    best_score, best_seq = exhaustive(logp, V, T)
    out = beam_search(step, {"t": torch.zeros(1, dtype=torch.long)}, BOS, EOS, beam_size=V ** T, max_length=T)
    assert tuple(out.tokens[0, : out.lengths[0]].tolist()) == best_seq
    assert out.scores[0].item() == pytest.approx(best_score, abs=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_beam_one_is_greedy(seed):
    step, _ = table_step(seed, 6, 6, eos_bias=0.0)
    state = {"t": torch.zeros(3, dtype=torch.long)}
    g = greedy(step, dict(state), BOS, EOS, max_length=6)
    b = beam_search(step, dict(state), BOS, EOS, beam_size=1, max_length=6)
    assert torch.equal(g.lengths, b.lengths)
    for i in range(3):
        assert g.tokens[i, : g.lengths[i]].tolist() == b.tokens[i, : b.lengths[i]].tolist()
    torch.testing.assert_close(g.scores, b.scores)


def tiny_decoder():
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=9, feature_dim=6, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)).eval()


def test_batched_beam_equals_one_image_at_a_time():
    model = tiny_decoder()
    feats = torch.randn(5, 196, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = beam_search(model.step, model.init_state(feats), BOS, EOS, beam_size=3, max_length=8)
        for i in range(5):
            one = beam_search(model.step, model.init_state(feats[i:i + 1]), BOS, EOS, beam_size=3, max_length=8)
            n = one.lengths[0]
            assert batched.lengths[i] == n
            assert batched.tokens[i, :n].tolist() == one.tokens[0, :n].tolist()
            torch.testing.assert_close(batched.scores[i], one.scores[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched.alphas[i, :n + 1], one.alphas[0, :n + 1], rtol=1e-5, atol=1e-6)


def test_beam_words_scores_and_attention_replay_under_teacher_forcing():
    """Traced back from the per-step pointers, each chosen caption, fed back through the
    decoder's teacher-forced forward, gives the same score and the same attention."""
    model = tiny_decoder()
    feats = 3 * torch.randn(6, 196, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.L_o.bias[EOS] += 0.1  # some captions end early (images leave the batch), some run to max_length
        out = beam_search(model.step, model.init_state(feats), BOS, EOS, beam_size=3, max_length=7)
        assert out.alphas.shape[:2] == out.tokens.shape
        assert {int(n) < 7 for n in out.lengths} == {True, False}
        for i in range(6):
            n = int(out.lengths[i])
            words = out.tokens[i, :n].tolist()
            closed = n < 7  # ended by <eos> (else cut at max_length)
            target = words + ([EOS] if closed else [])
            inputs = torch.tensor([[BOS] + target[:-1]])
            logits, alphas, *_ = model(feats[i:i + 1], inputs)  # (1, T, V), (1, T, L)
            score = logits.log_softmax(-1)[0, torch.arange(len(target)), torch.tensor(target)].sum()
            torch.testing.assert_close(out.scores[i], score, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.alphas[i, :len(target)], alphas[0], rtol=1e-5, atol=1e-6)
            assert (out.tokens[i, n:] == EOS).all()


def test_no_beam_finishes():
    step, _ = table_step(0, 5, 4, eos_bias=-1e9)  # <eos> never wins
    out = beam_search(step, {"t": torch.zeros(2, dtype=torch.long)}, BOS, EOS, beam_size=3, max_length=4)
    assert out.lengths.tolist() == [4, 4] and torch.isfinite(out.scores).all()
    assert (out.tokens[:, :4] != EOS).all()
    g = greedy(step, {"t": torch.zeros(2, dtype=torch.long)}, BOS, EOS, max_length=4)
    assert g.lengths.tolist() == [4, 4]


def test_suppress_and_length_penalty():
    step, _ = table_step(3, 6, 6, eos_bias=0.0)
    state = {"t": torch.zeros(1, dtype=torch.long)}
    out = beam_search(step, dict(state), BOS, EOS, beam_size=4, max_length=6, suppress=(3,))
    assert 3 not in out.tokens[0, : out.lengths[0]].tolist()
    short = beam_search(step, dict(state), BOS, EOS, beam_size=4, max_length=6)
    long = beam_search(step, dict(state), BOS, EOS, beam_size=4, max_length=6, length_penalty=2.0)
    assert long.lengths[0] >= short.lengths[0]


def test_length_penalty_is_exhaustive_search_of_normalized_scores():
    """A full-width beam with a penalty finds the caption of best log p / steps ** penalty; on
    some of these tables that is another caption than the unpenalized best (so ignoring the
    penalty fails here)."""
    V, T, penalty = 5, 4, 1.0
    changed = 0
    for seed in range(12):
        step, logp = table_step(seed, V, T, eos_bias=0.0)
        best_score, best_seq = exhaustive(logp, V, T, penalty)
        out = beam_search(step, {"t": torch.zeros(1, dtype=torch.long)}, BOS, EOS, beam_size=V ** T, max_length=T,
                          length_penalty=penalty)
        assert tuple(out.tokens[0, : out.lengths[0]].tolist()) == best_seq, seed
        assert out.scores[0].item() == pytest.approx(best_score, abs=1e-4)
        changed += best_seq != exhaustive(logp, V, T)[1]
    assert changed >= 2


def test_sampling_is_seeded_and_top_k_restricts():
    model = tiny_decoder()
    feats = torch.randn(4, 196, 6)
    with torch.no_grad():
        a = sample(model.step, model.init_state(feats), BOS, EOS, 8, generator=torch.Generator().manual_seed(0))
        b = sample(model.step, model.init_state(feats), BOS, EOS, 8, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a.tokens, b.tokens)
        g = greedy(model.step, model.init_state(feats), BOS, EOS, 8)
        k1 = sample(model.step, model.init_state(feats), BOS, EOS, 8, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(k1.tokens, g.tokens)  # top-1 sampling is greedy
    assert a.logprobs.shape == a.tokens.shape
