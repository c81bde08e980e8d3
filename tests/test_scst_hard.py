import json
import re

import pytest
import torch

from caption import train
from caption.encoder import CachedGrids, Captioner
from caption.model import Decoder, DecoderConfig
from caption.objective import HardAttention
from caption.scst import CiderD, scst_loss
from caption.vocab import Vocab
from tests.conftest import ROOT, tiny_args

REFS = {
    1: ["a man riding a horse on a beach", "a person rides a brown horse near the ocean", "man on horseback at the shore"],
    2: ["two dogs play in the snow", "dogs playing outside in the snow", "a pair of dogs running through snow"],
    3: ["a red circle left of a blue box", "a red disk and a blue square", "there is a red circle"],
    4: ["a plate of food with broccoli", "broccoli and rice on a white plate", "a meal of rice and vegetables"],
    5: ["a red circle", "a big red circle", "one red disk on a noisy background"],
}
RES = {1: "a man riding a horse on the beach", 2: "two dogs playing in the snow", 3: "a red circle and a blue box",
       4: "a plate of rice with broccoli", 5: "a red circle on the left"}


def test_cider_d_equals_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    gts = {i: v for i, v in REFS.items()}
    res = {i: [c] for i, c in RES.items()}
    mean, per_image = Cider().compute_score(gts, res)
    ours = CiderD([[r.split() for r in v] for v in REFS.values()])
    got = [ours.score(RES[i].split(), [r.split() for r in REFS[i]], key=i) for i in REFS]
    assert got == pytest.approx(list(per_image), abs=1e-6)
    assert sum(got) / len(got) == pytest.approx(mean, abs=1e-6)
    # cached reference vectors give the same score
    assert ours.score(RES[3].split(), [r.split() for r in REFS[3]], key=3) == pytest.approx(got[2], abs=1e-12)


def tiny_model(attention="soft"):
    torch.manual_seed(0)
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "circle", "blue", "box"]
    return Decoder(DecoderConfig(vocab_size=len(words), feature_dim=6, embed_dim=8, hidden_dim=16, attn_dim=8,
                                 dropout=0.0, attention=attention)), Vocab(words)


@pytest.mark.parametrize("labels, eos", [(True, True), (False, False)])
def test_document_frequencies_counted_per_shard_are_the_whole_passs(tiny_features, shapes, labels, eos):
    """The reward's CIDEr-D document frequencies, counted shard by shard (in 1 or 2 processes) as
    training counts them, equal those of one pass over every record's references."""
    import functools
    from caption.scst import reward_document_counts, reward_references
    from caption.vocab import build_from_split_file
    from shards import open_store
    from shards.passes import count_records
    vocab = build_from_split_file(shapes / "dataset.json", 2)
    store = open_store(tiny_features / "train")
    whole = CiderD(reward_references(r["captions"], vocab, 6, labels, eos) for r in store.records)
    count = functools.partial(reward_document_counts, vocab=vocab, max_length=6, labels=labels, eos=eos)
    for workers in (1, 2):
        per_shard = CiderD.from_counts(count_records([store], count, workers), store.manifest["count"])
        assert per_shard.df == whole.df and per_shard.ref_len == whole.ref_len and len(whole.df) > 100
    refs = [reward_references(r["captions"], vocab, 6, labels, eos) for r in store.records[:3]]
    assert per_shard.score(refs[0][0], refs[1]) == whole.score(refs[0][0], refs[1])


def test_scst_mean_baseline_skips_the_greedy_decode_off_log_steps():
    model, vocab = tiny_model()
    feats = torch.randn(2, 196, 6)
    refs = [[["a", "red", "circle"]] * 3, [["blue", "box"]] * 3]
    cider = CiderD(refs)
    losses = []
    for log_greedy in (True, False):
        gen = torch.Generator().manual_seed(0)
        loss, _, stats = scst_loss(model, feats, refs, ["k0", "k1"], vocab, cider, sample_n=4, baseline="mean",
                                   max_length=5, generator=gen, log_greedy=log_greedy)
        assert ("greedy_cider" in stats) == log_greedy
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])  # the measurement does not touch the loss


def test_scst_gradient_sign():
    """A sampled caption better than greedy gets its log-probability increased."""
    model, vocab = tiny_model()
    feats = torch.randn(1, 196, 6)
    refs = [[["a", "red", "circle"]] * 3]
    cider = CiderD(refs + [[["blue", "box"]]])
    gen = torch.Generator().manual_seed(0)
    loss, _, stats = scst_loss(model, feats, refs, ["k"], vocab, cider, sample_n=8, baseline="greedy", max_length=5,
                               generator=gen)
    loss.backward()
    # one SGD step along -grad, then the best-rewarded sample must be more likely than before
    from caption.decode import sample
    gen = torch.Generator().manual_seed(0)
    from caption.model import expand_state
    with torch.no_grad():
        out = sample(model.step, expand_state(model.init_state(feats), 8), 1, 2, 5, generator=gen)
    rewards = [cider.score([vocab.words[int(t)] for t in out.tokens[r, : out.lengths[r]]], refs[0], "k") for r in range(8)]
    best = max(range(8), key=lambda r: rewards[r])
    assert rewards[best] > stats["greedy_cider"]

    def logp_of(r):
        state = model.init_state(feats)
        tok, total = torch.tensor([1]), 0.0
        for t in range(int(out.lengths[r]) + 1):
            lp, state = model.step(tok, state)
            w = out.tokens[r, t] if t < out.tokens.shape[1] else torch.tensor(2)
            total += lp[0, w].item()
            tok = w.view(1)
        return total

    before = logp_of(best)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    assert logp_of(best) > before


def test_hard_attention_samples_one_hot_with_soft_expectation():
    model, _ = tiny_model("hard")
    model.train()
    feats = torch.randn(2, 196, 6)
    state = model.init_state(feats)
    state["hard_mask"] = torch.ones(2, dtype=torch.bool)
    alpha = model.attention(state["keys"], state["h"])
    torch.manual_seed(1)
    total = torch.zeros_like(alpha)
    n = 4000
    for _ in range(n):
        one_hot = model._hard_alpha(alpha, state)
        assert torch.equal(one_hot.sum(-1), torch.ones(2)) and set(one_hot.unique().tolist()) <= {0.0, 1.0}
        total += one_hot
    # the mean sampled context equals the soft context (Eq. 8-9: E[z] = sum_i alpha_i a_i)
    soft = torch.bmm(alpha[:, None], state["features"]).squeeze(1)
    sampled = torch.bmm((total / n)[:, None], state["features"]).squeeze(1)
    torch.testing.assert_close(sampled, soft, atol=0.08, rtol=0.05)
    # inference uses the soft expectation: z = beta * sum_i alpha_i a_i, the same at every call (no sampling)
    model.eval()
    state = model.init_state(feats)
    state["hard_mask"] = torch.ones(2, dtype=torch.bool)
    z, a = model.context(state)
    beta = torch.sigmoid(model.f_beta(state["h"]))
    torch.testing.assert_close(z, beta * torch.bmm(a[:, None], state["features"]).squeeze(1))
    assert (a > 0).all() and not set(a.unique().tolist()) <= {0.0, 1.0}  # not one-hot
    torch.testing.assert_close(model.context(state)[0], z, rtol=0, atol=0)


def test_hard_attention_objective_trains():
    model, vocab = tiny_model("hard")
    obj = HardAttention(vocab.pad_id, alpha_c=1.0, seq_per_img=1).train()
    model.train()
    feats = torch.randn(4, 196, 6)
    tokens = torch.tensor([[1, 4, 5, 6]] * 4)
    targets = torch.tensor([[4, 5, 6, 2]] * 4)
    torch.manual_seed(0)
    assert model(feats, tokens).hard_logp.shape == (4, 4)  # log p(s_t | a) of each caption's sampled locations
    total, ntok, stats = obj(Captioner(CachedGrids(), model), feats, tokens, targets)
    (total / ntok).backward()
    assert model.attention.key.weight.grad is not None and torch.isfinite(model.attention.key.weight.grad).all()
    assert "hard_baseline" in stats and stats["hard_baseline"].item() != 0.0


def test_scst_training_resumes_mid_run(shapes, tiny_features, tmp_path):
    run = tmp_path / "run"
    common = ("--max_epochs", "3", "--self_critical_after", "1", "--sc_sample_n", "3")
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), *common, "--max_steps", "30")) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("reward" in r and "greedy_cider" in r for r in rows)  # SCST ran in epoch 1 (24 steps per epoch)
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), *common, "--max_steps", "40",
                                "--resume", "true")) == 0
    assert json.loads((run / "state" / "progress.json").read_text())["step"] == 40


def test_two_process_scst(shapes, tiny_features, tmp_path, run_torchrun):
    r = run_torchrun(ROOT / "caption" / "train.py",
                     *tiny_args(shapes, tiny_features, "--checkpoint_path", str(tmp_path / "run"), "--max_epochs", "1",
                                "--self_critical_after", "0", "--sc_sample_n", "2", "--sc_baseline", "greedy"))
    out = r.out
    assert r.returncode == 0, out[-3000:]
    assert sorted(re.findall(r"rank \d/2: \d+ batches this run", out)) == [
        "rank 0/2: 12 batches this run", "rank 1/2: 12 batches this run"]
