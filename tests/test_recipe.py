"""The COCO recipes as their sources define them: each config trains and says its global batch;
one trajectory whatever the process count; a float32 recurrence under autocast; SCST's reward
with <eos> as self-critical.pytorch computes it; hard attention with capgen.py's semantics; the
authors' model options and early stopping."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from caption import train
from caption.resident import shared_path
from caption.model import Decoder, DecoderConfig, Forced
from caption.objective import HardAttention
from caption.scst import CiderD, reward_references, words_of
from caption.vocab import Vocab
from common import config as C
from tests.conftest import ROOT, tiny_args

RECIPES = ["coco", "coco_authors", "coco_fast", "coco_hard", "coco_scst"]


def on_shapes(shapes, features, run, *extra):
    """A recipe's settings, on the tiny world's data, for a few steps."""
    return ["--input_json", str(shapes / "dataset.json"), "--images_root", "", "--features", str(features),
            "--checkpoint_path", str(run), "--max_steps", "2", "--val_images_use", "4", "--num_workers", "0",
            "--mixed_precision", "no", "--save_checkpoint_every", "0", "--features_in_memory", "off", *extra]


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_and_says_its_global_batch(recipe, shapes, tiny_features, tmp_path, capsys):
    cfg = C.load(ROOT / "configs" / f"{recipe}.yaml")
    extra = ["--global_batch_size", "4"] if cfg.train.global_batch_size else ["--batch_size", "4"]
    if cfg.train.self_critical_after >= 0:
        extra += ["--self_critical_after", "0", "--sc_sample_n", "2"]
    args = ["--config", str(ROOT / "configs" / f"{recipe}.yaml"), *on_shapes(shapes, tiny_features, tmp_path / "run", *extra)]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    lr = cfg.train.learning_rate
    assert re.search(rf"global batch: 4 images x 5 = 20 captions per optimizer step; 24 updates per epoch, 2 in all; "
                     rf"learning rate {lr:g}", out), out
    saved = C.load(tmp_path / "run" / "config.yaml")
    assert saved.model.hidden_dim == cfg.model.hidden_dim and saved.model.attn_layers == cfg.model.attn_layers


def test_the_seeds_command_and_the_authors_model_are_written_down():
    seed = C.load(ROOT / "configs" / "coco.yaml").train
    assert (seed.global_batch_size, seed.seq_per_img, seed.learning_rate, seed.learning_rate_decay_start,
            seed.learning_rate_decay_every, seed.learning_rate_decay_rate, seed.max_epochs, seed.val_images_use,
            seed.save_checkpoint_every) == (10, 5, 5e-4, 0, 3, 0.8, 25, 5000, 6000)
    authors = C.load(ROOT / "configs" / "coco_authors.yaml")
    assert (authors.model.hidden_dim, authors.model.attn_layers, authors.model.init) == (1800, 2, "authors")
    assert (authors.train.learning_rate, authors.train.learning_rate_decay_start, authors.train.select_on,
            authors.train.early_stop_patience) == (2e-4, -1, "nll", 10)


def test_global_batch_must_divide_and_lr_scaling(shapes, tiny_features, tmp_path, capsys):
    from caption.train import resolve_batch
    cfg = C.load(ROOT / "configs" / "tiny.yaml")
    cfg = C.from_dict({**C.to_dict(cfg), "train": {**C.to_dict(cfg)["train"], "global_batch_size": 10}})
    assert resolve_batch(cfg, 2).train.batch_size == 5 and resolve_batch(cfg, 1).train.batch_size == 10
    with pytest.raises(train.TrainError, match="does not divide over 4 process"):
        resolve_batch(cfg, 4)
    scaled = C.from_dict({**C.to_dict(cfg), "train": {**C.to_dict(cfg)["train"], "global_batch_size": 0, "scale_lr": True}})
    assert resolve_batch(scaled, 4).train.learning_rate == pytest.approx(4 * cfg.train.learning_rate)
    assert resolve_batch(scaled, 1).train.learning_rate == cfg.train.learning_rate


RECIPES = {  # the shipped recipes' semantics at tiny sizes
    "soft, no dropout": ["--dropout", "0"],
    "coco.yaml: dropout 0.5, the seed's loss per caption and value clipping": [
        "--dropout", "0.5", "--loss_per", "caption", "--grad_clip_mode", "value", "--grad_clip", "0.1"],
    "coco_hard.yaml: hard attention, a coin per batch, entropy, dropout": [
        "--dropout", "0.5", "--attention", "hard", "--semi_sampling", "batch", "--semi_sampling_p", "0.5",
        "--entropy_weight", "0.002", "--baseline_decay", "0.9"],
    "hard attention, a coin per caption": ["--dropout", "0.5", "--attention", "hard", "--semi_sampling", "caption"],
    "scheduled sampling (from epoch 1: steps 13-14)": [
        "--dropout", "0.5", "--scheduled_sampling_start", "0", "--scheduled_sampling_increase_prob", "0.25",
        "--scheduled_sampling_increase_every", "1", "--max_steps", "14"],
    "coco_authors.yaml: authors' init (its dropout), zero y_0, 2-layer attention, capgen's weights": [
        "--dropout", "0.5", "--init", "authors", "--first_input", "zero", "--weight_init", "authors",
        "--attn_layers", "2", "--alpha_c", "0.33", "--loss_per", "caption", "--grad_clip", "0"],
    "coco_fast.yaml: features held in memory (one shared copy), dropout": [
        "--dropout", "0.5", "--features_in_memory", "ram"],
    "coco_scst.yaml: self-critical, 5 samples, mean baseline, <eos>, dropout": [
        "--dropout", "0.5", "--self_critical_after", "0", "--sc_sample_n", "5", "--sc_baseline", "mean",
        "--sc_references", "labels", "--sc_eos", "true", "--loss_per", "token", "--grad_clip_mode", "value",
        "--grad_clip", "0.1"],
    "shapes.yaml (the demo): the attention's query reads the word just emitted, alpha_c 0.2, dropout 0.1": [
        "--dropout", "0.1", "--attention_query", "state_word", "--alpha_c", "0.2"],
    "self-critical with the greedy baseline": [
        "--dropout", "0.5", "--self_critical_after", "0", "--sc_sample_n", "3", "--sc_baseline", "greedy"],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_two_processes_follow_the_one_process_trajectory(recipe, shapes, tiny_features, tmp_path, run_torchrun):
    """The same global batch on 1 and on 2 real processes (torchrun, gloo): the same logged loss and
    cross entropy at every step and the same weights after 6 steps, with the recipe's randomness
    (dropout masks, sampled locations, coins) drawn per caption (caption/noise.py)."""
    common = ["--global_batch_size", "8", "--max_steps", "6", "--save_checkpoint_every", "0",
              "--num_workers", "0", "--log_every", "1", *RECIPES[recipe]]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(one), *common)) == 0
    r = run_torchrun(ROOT / "caption" / "train.py", *tiny_args(shapes, tiny_features, "--checkpoint_path", str(two), *common))
    assert r.returncode == 0, r.out[-3000:]
    assert "2 process(es)" in r.stdout and "global batch: 8 images" in r.stdout  # once: the main process's lines
    assert r.out.count("global batch: 8 images") == 1
    w1, w2 = load_file(str(one / "last.safetensors")), load_file(str(two / "last.safetensors"))
    # attention.score.bias shifts every e_ti alike: softmax cancels it, its gradient is 0 up to rounding,
    # and Adam turns rounding noise of either sign into lr-sized steps. Every other weight must agree.
    diffs = {k: (w1[k] - w2[k]).abs().max().item() for k in w1 if k != "attention.score.bias"}
    assert max(diffs.values()) < 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    rows1, rows2 = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
                    for run in (one, two))
    steps = int(common[len(common) - 1 - common[::-1].index("--max_steps") + 1])  # the last --max_steps given
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == list(range(1, steps + 1))
    for r1, r2 in zip(rows1, rows2):  # loss and the objective's stats (xent, reward, baseline, ...)
        keys = set(r1) - {"captions_per_s"}
        assert keys == set(r2) - {"captions_per_s"} and {"loss", "lr"} < keys, (r1, r2)
        assert {k: r1[k] for k in keys} == pytest.approx({k: r2[k] for k in keys}, rel=1e-4, abs=1e-5), r1["step"]
    if json.loads((one / "state" / "progress.json").read_text())["best_step"] == steps:  # best is the last step's
        init = load_file(str(one / "best.safetensors"))
        assert all(torch.equal(init[k], w1[k]) for k in w1)
    assert json.loads((two / "state" / "progress.json").read_text())["step"] == steps
    assert not shared_path(two).exists()  # features held in memory: nothing left in /dev/shm


def tiny_decoder(**kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=12, feature_dim=6, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0, **kw))


def test_recurrence_stays_float32_under_autocast():
    model = tiny_decoder()
    feats, tokens = torch.randn(2, 196, 6), torch.randint(3, 12, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.init_state(feats)
        _, state = model.step(tokens[:, 0], state)
        z, alpha = model.context(state)
        logits, alphas, *_ = model(feats, tokens)
    assert state["h"].dtype == state["c"].dtype == state["alpha"].dtype == torch.float32
    assert alpha.dtype == alphas.dtype == torch.float32 and z.dtype == torch.float32
    assert state["keys"].dtype == torch.bfloat16 and logits.dtype == torch.bfloat16  # the big products in bf16
    old = tiny_decoder(fp32_recurrence=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, s = old.step(tokens[:, 0], old.init_state(feats))
    assert s["h"].dtype == torch.bfloat16  # the previous path: nn.LSTMCell in bf16
    # without autocast the fp32 path is nn.LSTMCell itself, bit for bit
    with torch.no_grad():
        a = model(feats, tokens)[0]
        b = tiny_decoder(fp32_recurrence=False)(feats, tokens)[0]
    assert torch.equal(a, b)


@pytest.mark.slow
def test_bf16_training_tracks_fp32(shapes, tiny_features):
    """40 steps on the tiny world's grids: bf16 autocast (fp32 recurrence) ends within 3% of fp32's loss."""
    from caption.data import train_batches
    from shards import open_store
    from caption.model import sequence_loss
    from caption.vocab import build_from_split_file
    vocab = build_from_split_file(shapes / "dataset.json", 2)
    batches = list(train_batches(open_store(tiny_features / "train"), vocab, batch_size=8, seq_per_img=5, max_length=12, seed=0,
                                 epoch=0)[1])
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=256, embed_dim=32, hidden_dim=64, attn_dim=32,
                                      dropout=0.0))
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        curve = []
        for _ in range(4):
            for b in batches[:10]:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits, alphas, *_ = model(b["features"], b["tokens"], 5)
                total, xent, ntok = sequence_loss(logits, b["targets"], alphas, vocab.pad_id, 1.0)
                (total / ntok).backward()
                opt.step()
                opt.zero_grad()
                curve.append((xent / ntok).item())
        losses[precision] = sum(curve[-10:]) / 10
        assert losses[precision] < 0.85 * (sum(curve[:10]) / 10), precision  # it learned
    assert abs(losses["bf16"] - losses["fp32"]) < 0.03 * losses["fp32"], losses


def test_scst_reward_with_eos_is_pycocoevalcaps_cider_over_the_same_strings():
    """Our reward on a fixed set equals pycocoevalcap's CIDEr-D over the same strings with the end
    token appended (hypotheses that ended, references always), document frequencies over the set."""
    from pycocoevalcap.cider.cider import Cider
    vocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "circle", "blue", "box", "left", "of", "the"])
    refs = [[["a", "red", "circle", "left", "of", "the", "box"], ["the", "red", "circle"], ["a", "zebra", "circle"]],
            [["a", "blue", "box"], ["the", "blue", "box", "left", "of", "a", "circle"]],
            [["a", "circle"], ["a", "red", "box", "of", "a", "blue", "circle", "left"]]]
    labels = [reward_references(r, vocab, 6, labels=True, eos=True) for r in refs]
    assert labels[0][2] == ["a", "<unk>", "circle", "<eos>"] and labels[2][1][-2:] == ["blue", "<eos>"]  # cut at 6
    tokens = torch.tensor([[4, 5, 6, 2, 0, 0], [4, 7, 8, 9, 10, 4]])  # one ended, one ran to max_length
    hyps = words_of(tokens, torch.tensor([3, 6]), vocab, eos=True)
    assert hyps == [["a", "red", "circle", "<eos>"], ["a", "blue", "box", "left", "of", "a"]]
    cider = CiderD(labels)
    ours = [cider.score(hyps[i], labels[i]) for i in range(2)] + [cider.score(hyps[0], labels[2])]
    gts = {i: [" ".join(r) for r in labels[i]] for i in range(3)}
    res = {0: [" ".join(hyps[0])], 1: [" ".join(hyps[1])], 2: [" ".join(hyps[0])]}
    _, theirs = Cider().compute_score(gts, res)
    assert ours == pytest.approx(list(theirs), abs=1e-6)
    assert ours[0] != pytest.approx(CiderD(refs).score(hyps[0][:-1], refs[0]), abs=1e-3)  # <eos> changes the reward


def test_semi_sampling_is_the_probability_of_sampling():
    """p = 0.2: about 20% of minibatches sample (all their captions together), or 20% of captions."""
    torch.manual_seed(0)
    feats, tokens = torch.randn(4, 196, 6), torch.randint(3, 12, (8, 3))
    rates = {}
    for mode in ("batch", "caption"):
        model = tiny_decoder(attention="hard", semi_sampling_p=0.2, semi_sampling=mode).train()
        masks = []
        for _ in range(400):
            masks.append(model(feats, tokens, seq_per_img=2).hard_mask.clone())
        masks = torch.stack(masks).float()  # (400, 8)
        rates[mode] = masks.mean().item()
        if mode == "batch":
            assert ((masks == 0) | (masks == 1)).all() and (masks.std(1) == 0).all()  # one coin per minibatch
        else:
            assert (masks.std(1) > 0).any()
    assert rates["batch"] == pytest.approx(0.2, abs=0.05) and rates["caption"] == pytest.approx(0.2, abs=0.03)


def test_hard_attention_terms_weigh_as_capgen():
    """The REINFORCE and entropy terms against a hand computation of capgen.py's rule, x N captions.
    c_n is a caption's NLL over its own length: capgen's batches hold captions of one length
    (homogeneous_data.py), so its division by the batch length is a division by each caption's."""
    vocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(8)]])
    obj = HardAttention(vocab.pad_id, seq_per_img=1, entropy_weight=0.01, baseline_decay=0.9)
    obj.baseline.fill_(0.5)
    torch.manual_seed(1)
    N, T, L = 3, 4, 196
    logits, alphas = torch.randn(N, T, 12), torch.softmax(torch.randn(N, T, L), -1)
    targets = torch.tensor([[4, 5, 2, 0], [6, 7, 8, 2], [9, 2, 0, 0]])
    hard_logp = torch.randn(N, T)
    got = obj.terms(Forced(logits, alphas, hard_logp, torch.tensor([True, False, True])), targets, {})
    mask = (targets != 0).float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask
    c = nll.sum(1) / mask.sum(1)
    want_rf = sum((c[n] - 0.5) / 10 * (hard_logp[n] * mask[n]).sum() for n in (0, 2))
    want_ent = 0.01 * ((alphas * alphas.log()).sum(-1) * mask).sum()
    torch.testing.assert_close(got, N * (want_rf + want_ent))
    assert obj.baseline.item() == pytest.approx(0.9 * 0.5 + 0.1 * c.mean().item())


def test_authors_model_options():
    m = tiny_decoder(attn_layers=2, init="authors")
    key = m.attention.key  # capgen.py:356-362: tanh(W' (W_c a + b) + b')
    assert [type(k) for k in key] == [torch.nn.Linear, torch.nn.Linear, torch.nn.Tanh]
    a = torch.randn(3, 6)
    torch.testing.assert_close(key(a), torch.tanh(key[1](key[0](a))))
    assert isinstance(m.init_shared[1], torch.nn.ReLU) and isinstance(m.init_h[1], torch.nn.Tanh)
    state = m.init_state(torch.randn(2, 196, 6))
    assert state["h"].abs().max() < 1 and state["c"].abs().max() < 1  # tanh outputs
    mean = m.init_shared(torch.zeros(1, 6))
    assert (mean >= 0).all()  # ReLU
    assert "init_shared.0.weight" in m.state_dict() and "init_shared.0.weight" not in tiny_decoder().state_dict()


def test_early_stopping_on_validation_nll(shapes, tiny_features, tmp_path, capsys):
    """learning_rate ~0: validation NLL cannot improve after the first validation; patience 2 stops it."""
    run = tmp_path / "run"
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--learning_rate", "1e-12",
                                "--save_checkpoint_every", "3", "--select_on", "nll", "--early_stop_patience", "2",
                                "--max_epochs", "3")) == 0
    out = capsys.readouterr().out
    assert "(stopped early)" in out and "best val NLL" in out
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert progress["bad_validations"] >= 2 and progress["step"] < 3 * 24
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_NLL"] > 0 for r in rows if "val_NLL" in r)


def test_authors_objective_equals_capgens_at_its_weight():
    """An oracle: capgen.py's deterministic cost (1164, 1177) on a batch of same-length captions
    (homogeneous_data.py), J = mean_n sum_t NLL_tn + alpha_c * mean_l sum_n (1 - sum_t alpha_tnl)^2,
    written in its (T, N, L) layout, equals our loss with `loss_per caption` (coco_authors.yaml) and
    our alpha_c = capgen's x N / L (0.33 at capgen's 64 captions: the term is ours per caption)."""
    from caption.encoder import CachedGrids, Captioner
    from caption.objective import CrossEntropy
    torch.manual_seed(0)
    dec = tiny_decoder().eval()
    N, T, L = 6, 4, 196
    feats = torch.randn(N, L, 6)
    targets = torch.randint(4, 12, (N, T))
    targets[:, -1] = 2  # every caption T - 1 words and <eos>: one length, as capgen's batches
    tokens = torch.cat([torch.full((N, 1), 1), targets[:, :-1]], 1)
    out = dec(feats, tokens)
    logp = out.logits.log_softmax(-1).gather(2, targets[..., None])[..., 0]  # (N, T)
    alphas = out.alphas.transpose(0, 1)  # capgen's layout (T, N, L)
    capgen_alpha_c = 1.0
    J = (-logp.T).sum(0).mean() + capgen_alpha_c * ((1.0 - alphas.sum(0)) ** 2).sum(0).mean()
    ours, norm, stats = CrossEntropy(0, alpha_c=capgen_alpha_c * N / L, seq_per_img=1, per="caption")(
        Captioner(CachedGrids(), dec), feats, tokens, targets)
    assert norm.item() == N and stats["tokens"].item() == N * T
    torch.testing.assert_close(ours / norm, J, rtol=1e-5, atol=1e-5)


def test_the_seeds_loss_is_ours_per_caption():
    """An oracle: the seed's LanguageModelCriterion (utils/utils.py:6-21) transcribed, on captions of
    mixed length (pad 0 after <eos>), equals our loss with `loss_per caption` (configs/coco.yaml) and
    alpha_c 0 (the seed has no such term); with `loss_per token` it is the same sum / the words."""
    from caption.encoder import CachedGrids, Captioner
    from caption.objective import CrossEntropy
    torch.manual_seed(1)
    dec = tiny_decoder().eval()
    N, T = 7, 6
    feats = torch.randn(N, 196, 6)
    targets = torch.randint(4, 12, (N, T))
    lengths = torch.tensor([1, 2, 5, 5, 3, 4, 2])  # words before <eos>
    for n, k in enumerate(lengths.tolist()):
        targets[n, k], targets[n, k + 1:] = 2, 0
    tokens = torch.cat([torch.full((N, 1), 1), targets[:, :-1]], 1)
    preds = dec(feats, tokens).logits  # (N, T, V) scores, as the seed's decoder returns them
    masks = (targets != 0).float()

    def seed_criterion(preds, labels, masks):  # utils/utils.py:11-21
        xe_loss = torch.nn.CrossEntropyLoss(reduction="none")
        total_loss = 0.0
        for t in range(preds.size(1)):
            total_loss += torch.sum(xe_loss(preds[:, t], labels[:, t]) * masks[:, t])
        return total_loss / preds.size(0)

    net = Captioner(CachedGrids(), dec)
    total, norm, _ = CrossEntropy(0, alpha_c=0.0, seq_per_img=1, per="caption")(net, feats, tokens, targets)
    torch.testing.assert_close(total / norm, seed_criterion(preds, targets, masks), rtol=1e-5, atol=1e-5)
    total, norm, _ = CrossEntropy(0, alpha_c=0.0, seq_per_img=1, per="token")(net, feats, tokens, targets)
    torch.testing.assert_close(total / norm, seed_criterion(preds, targets, masks) * N / masks.sum(), rtol=1e-5, atol=1e-5)


def test_self_critical_loss_is_self_critical_pytorchs():
    """An oracle: sc's RewardCriterion (captioning/modules/losses.py:18-35) transcribed, its word 0
    both the end token and padding, on sampled captions of mixed length (some never ending), equals
    our policy loss divided by its token count (`loss_per token`, configs/coco_scst.yaml)."""
    from caption.scst import policy_loss
    torch.manual_seed(2)
    N, T, V = 8, 6, 10
    logp_all = torch.randn(N, T, V).log_softmax(-1)  # (N, T, V): sc's `input`
    seq = torch.randint(1, V, (N, T))  # sc's sampled words, 0 = end
    lengths = torch.tensor([0, 1, 3, 6, 2, 6, 5, 4])  # 6 = T: no end within T
    for n, k in enumerate(lengths.tolist()):
        seq[n, k:] = 0
    advantage = torch.randn(N)
    reward = advantage[:, None].expand(N, T)  # sc broadcasts each sample's reward over its steps

    def reward_criterion(input, seq, reward):  # losses.py:22-35, reduction "mean"
        input = input.gather(2, seq.unsqueeze(2)).squeeze(2).reshape(-1)
        reward = reward.reshape(-1)
        mask = (seq > 0).to(input)
        mask = torch.cat([mask.new(mask.size(0), 1).fill_(1), mask[:, :-1]], 1).reshape(-1)
        return torch.sum(-input * reward * mask) / torch.sum(mask)

    ours_logp = logp_all.gather(2, seq[..., None])[..., 0]  # our sampled words' log p; sc's word 0 = our <eos>
    total, tokens = policy_loss(ours_logp, lengths, advantage)
    torch.testing.assert_close(total / tokens, reward_criterion(logp_all, seq, reward), rtol=1e-6, atol=1e-6)


def capgen_early_stopping(errors: list[float], epochs: list[int], patience: int) -> tuple[list[int], int | None]:
    """capgen.py:1337-1353 transcribed: (the validations that saved _bestll, the one that stopped)."""
    history, bad_counter, best = [], 0, []
    for i, (valid_err, eidx) in enumerate(zip(errors, epochs)):
        history.append(valid_err)
        if i == 0 or valid_err <= min(history):  # uidx == 0 never validates after an update; the first is the best
            best.append(i)
            bad_counter = 0
        if eidx > patience and len(history) > patience and valid_err >= min(history[:-patience]):
            bad_counter += 1
            if bad_counter > patience:
                return best, i
    return best, None


def test_authors_early_stopping_is_capgens():
    """early_stop_rule authors (caption/train.py judge, stopped_early) replays capgen's bad_counter on
    random validation curves: the same validations save best, and the same one stops the run."""
    from types import SimpleNamespace
    rng = torch.Generator().manual_seed(0)
    for trial in range(300):
        patience = int(torch.randint(1, 4, (1,), generator=rng))
        n = int(torch.randint(3, 40, (1,), generator=rng))
        per_epoch = int(torch.randint(1, 3, (1,), generator=rng))
        errors = (3 - torch.linspace(0, 1, n) + 0.3 * torch.rand(n, generator=rng)).round(decimals=1).tolist()  # ties too
        epochs = [i // per_epoch for i in range(n)]
        want_best, want_stop = capgen_early_stopping(errors, epochs, patience)
        tcfg = C.TrainConfig(early_stop_patience=patience, early_stop_rule="authors", select_on="nll")
        p, best, stop = train.Progress(), [], None
        for i, (err, epoch) in enumerate(zip(errors, epochs)):
            p.step, p.epoch = i + 1, epoch
            train.judge(p, -err, tcfg)  # ours: higher is better
            if p.best_step == i + 1:
                best.append(i)
            if train.stopped_early(SimpleNamespace(cfg=SimpleNamespace(train=tcfg), progress=p)):
                stop = i
                break
        assert (best, stop) == (want_best, want_stop), (trial, errors, epochs, patience)


def test_the_authors_first_input_and_weights():
    """first_input zero: y_0's embedding is a zero vector that stays zero while training; weight_init
    authors: square matrices orthogonal, others N(0, 0.01^2), the LSTM's recurrent blocks orthogonal,
    biases zero; init authors drops out its shared layer in training, per image, not in eval."""
    from caption.noise import RowNoise
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=40, feature_dim=32, embed_dim=24, hidden_dim=32, attn_dim=32, dropout=0.5,
                        init="authors", first_input="zero", weight_init="authors", attn_layers=2)
    model = Decoder(cfg)
    assert not model.embed.weight[1].any()  # <bos>
    feats, tokens = torch.randn(2, 9, 32), torch.randint(3, 40, (6, 5))
    tokens[:, 0] = 1
    out = model(feats, tokens, seq_per_img=3)
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), torch.randint(3, 40, (30,))).backward()
    assert model.embed.weight.grad[1].abs().sum() == 0 and model.embed.weight.grad[5:].abs().sum() > 0
    eye = torch.eye(32)
    for w in (model.init_shared[0].weight, model.attention.key[1].weight):  # square: orthogonal
        assert torch.allclose(w @ w.T, eye, atol=1e-5)
    for k in range(4):
        u = model.lstm.weight_hh[k * 32:(k + 1) * 32]
        assert torch.allclose(u @ u.T, eye, atol=1e-5)
    for w in (model.L_o.weight, model.lstm.weight_ih, model.embed.weight[2:], model.attention.score.weight):
        assert 0.007 < w.std().item() < 0.013
    for m in model.modules():
        for name in ("bias", "bias_ih", "bias_hh"):
            b = getattr(m, name, None)
            if isinstance(b, torch.Tensor):
                assert not b.any(), m
    # init dropout: in training each image's mask from its own numbers (one image, two processes' views)
    one = RowNoise.for_batch(7, 3, 2, 3)
    h_one = model.init_state(feats, one)["h"]
    h_rank1 = model.init_state(feats[1:], RowNoise.for_batch(7, 3, 1, 3, rank=1, world=2))["h"]
    assert torch.allclose(h_one[1], h_rank1[0], atol=1e-6)
    model.eval()
    assert not torch.allclose(model.init_state(feats)["h"], h_one)  # eval: no dropout
    assert torch.equal(model.init_state(feats)["h"], model.init_state(feats)["h"])
