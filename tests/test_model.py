import torch

from caption import kernels
from caption.model import Decoder, DecoderConfig, sequence_loss

B, S, L, D, V, T = 3, 2, 196, 24, 11, 7


def tiny(attention="soft", dropout=0.0):
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=V, feature_dim=D, embed_dim=8, hidden_dim=16, attn_dim=12,
                                 dropout=dropout, attention=attention))


def batch():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(B, 14, 14, D, generator=g)
    tokens = torch.randint(4, V, (B * S, T), generator=g)
    tokens[:, 0] = 1  # <bos>
    targets = torch.randint(4, V, (B * S, T), generator=g)
    targets[0, 4:] = 0  # a short caption, padded
    targets[0, 3] = 2
    return features, tokens, targets


def test_shapes_and_attention_sums_to_one():
    model = tiny()
    features, tokens, _ = batch()
    logits, alphas, *_ = model(features, tokens, seq_per_img=S)
    assert logits.shape == (B * S, T, V) and alphas.shape == (B * S, T, L)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(B * S, T))
    state = model.init_state(features)
    assert state["features"].shape == (B, L, D) and state["keys"].shape == (B, L, 12)
    assert state["h"].shape == state["c"].shape == (B, 16)
    logp, state = model.step(torch.ones(B, dtype=torch.long), state)
    assert logp.shape == (B, V) and state["alpha"].shape == (B, L)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(B))


def test_keys_projected_once_per_image():
    model = tiny()
    rows = []
    model.attention.key.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    features, tokens, _ = batch()
    model(features, tokens, seq_per_img=S)
    assert rows == [B]  # one projection of B images, not B*S captions x T steps


def test_attention_is_the_papers_tanh_mlp():
    """The fp32 paths (sigmoid identity, chunked without autograd) equal w^T tanh(W_a a + W_h h + b) + b_w."""
    model = tiny()
    att = model.attention
    features = torch.randn(B, L, D)
    h = torch.randn(B * S, 16, requires_grad=True)

    def reference(h):
        pre = att.key(features)[:, None] + att.query(h).view(B, S, 1, -1)  # (B, S, L, A)
        return att.score(torch.tanh(pre)).view(B * S, L).softmax(-1)

    want = reference(h)
    got = att(att.keys(features), h)  # autograd path
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_want,) = torch.autograd.grad(want[:, :5].sum(), h)
    (g_got,) = torch.autograd.grad(got[:, :5].sum(), h)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        keys, q = att.keys(features), att.query(h).view(B, S, 1, -1)
        w2 = 2 * att.score.weight.view(-1)
        whole = kernels.chunked(keys, q, w2)
        assert torch.equal(whole, torch.matmul(torch.sigmoid(2 * keys[:, None] + 2 * q), w2))  # 2(k + q): 2k + 2q's bits
        for chunk_bytes in (1, S * L * 12 * 4 * 2):  # one image per chunk; two images, a short last chunk
            torch.testing.assert_close(kernels.chunked(keys, q, w2, chunk_bytes), whole)
        torch.testing.assert_close(att(keys, h), want, rtol=1e-5, atol=1e-6)
        # Half precision keeps the tanh form.
        torch.testing.assert_close(att.half()(keys.half(), h.half()).float(), want, rtol=0, atol=2e-3)


def test_scalar_gate_and_deep_output():
    model = tiny()
    assert model.f_beta.out_features == 1  # beta is a scalar per step (Sec. 4.2.1), not a D-wide vector
    assert model.L_h.out_features == model.L_z.out_features == model.L_o.in_features == 8


def test_loss_ignores_padding():
    model = tiny()
    features, tokens, targets = batch()
    logits, alphas, *_ = model(features, tokens, seq_per_img=S)
    total, xent, ntok = sequence_loss(logits, targets, alphas, pad_id=0, alpha_c=1.0)
    assert ntok.item() == (targets != 0).sum().item()
    logits2, alphas2 = logits.clone(), alphas.clone()
    logits2[0, 4:] = torch.randn_like(logits2[0, 4:]) * 100  # pad positions
    alphas2[0, 4:] = torch.rand_like(alphas2[0, 4:])
    total2, xent2, _ = sequence_loss(logits2, targets, alphas2, pad_id=0, alpha_c=1.0)
    torch.testing.assert_close(total, total2)
    torch.testing.assert_close(xent, xent2)
    # the regularizer: lambda * sum_i (1 - sum_t alpha_ti)^2 over real steps
    mask = (targets != 0).float()
    reg = ((1 - (alphas * mask[..., None]).sum(1)) ** 2).sum()
    torch.testing.assert_close(total - xent, reg)


def test_teacher_forcing_equals_stepping():
    model = tiny().eval()
    features, tokens, _ = batch()
    logits, alphas, *_ = model(features, tokens, seq_per_img=S)
    state = model.init_state(features)
    state = {k: v.repeat_interleave(S, 0) for k, v in state.items()}
    for t in range(T):
        logp, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(logp, logits[:, t].log_softmax(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state["alpha"], alphas[:, t], rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_parameter():
    model = tiny(dropout=0.5).train()
    features, tokens, targets = batch()
    logits, alphas, *_ = model(features, tokens, seq_per_img=S)
    total, _, ntok = sequence_loss(logits, targets, alphas, 0, 1.0)
    (total / ntok).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_scheduled_sampling_feeds_model_samples():
    model = tiny().train()
    features, tokens, targets = batch()
    torch.manual_seed(0)
    plain, *_ = model(features, tokens, seq_per_img=S, ss_prob=0.0)
    torch.manual_seed(0)
    sampled, alphas, *_ = model(features, tokens, seq_per_img=S, ss_prob=1.0)
    assert sampled.shape == plain.shape and alphas.shape == (B * S, T, L)
    torch.testing.assert_close(sampled[:, 0], plain[:, 0])  # step 0 always sees <bos>
    assert not torch.allclose(sampled[:, 1:], plain[:, 1:])  # later steps see the model's own words


def test_train_schedules():
    from common.config import TrainConfig
    from caption.train import lr_lambda, ss_prob
    t = TrainConfig(learning_rate_decay_start=2, learning_rate_decay_every=3, learning_rate_decay_rate=0.5,
                    scheduled_sampling_start=1, scheduled_sampling_increase_every=2, scheduled_sampling_increase_prob=0.1,
                    scheduled_sampling_max_prob=0.25)
    f = lr_lambda(t, steps_per_epoch=10)
    assert [f(e * 10) for e in range(0, 9)] == [1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25]  # self-critical.pytorch's rule
    assert [ss_prob(t, e) for e in range(0, 8)] == [0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.25]


def test_attention_query_with_the_word_just_read():
    """attention_query state_word: step t's attention reads E y_{t-1} beside h_{t-1} (so the same
    state looks elsewhere after another word); the default is the paper's, which cannot. Teacher
    forcing equals stepping, and every parameter gets a gradient."""
    def step_alpha(model, word):
        state = model.init_state(torch.randn(1, L, D, generator=torch.Generator().manual_seed(3)))
        return model.step(torch.tensor([word]), state)[1]["alpha"]
    paper = tiny()
    assert paper.cfg.attention_query == "state" and paper.attention.query_word is None
    torch.testing.assert_close(step_alpha(paper, 5), step_alpha(paper, 6), rtol=0, atol=0)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=V, feature_dim=D, embed_dim=8, hidden_dim=16, attn_dim=12, dropout=0.0,
                                  attention_query="state_word")).eval()
    assert not torch.allclose(step_alpha(model, 5), step_alpha(model, 6))
    features, tokens, targets = batch()
    logits, alphas, *_ = model(features, tokens, seq_per_img=S)
    state = {k: v.repeat_interleave(S, 0) for k, v in model.init_state(features).items()}
    for t in range(T):
        logp, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(logp, logits[:, t].log_softmax(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state["alpha"], alphas[:, t], rtol=1e-5, atol=1e-6)
    model.train()
    logits, alphas, *_ = model(features, tokens, seq_per_img=S)
    total, _, ntok = sequence_loss(logits, targets, alphas, 0, 1.0)
    (total / ntok).backward()
    assert model.attention.query_word.weight.grad.abs().sum() > 0
