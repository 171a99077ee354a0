"""Tests for losses.py and the library part of attributes.py (pytest, CPU, no model.py needed).

Each equation E1–E7 has an oracle test against a deliberately naive loop written from the spec
(APTM_SPEC.md §2), named after the equation so that it doubles as an autograder; the rest are
invariants (ignored labels, sampler guarantees, totals, tables, metrics) and a forward + backward
pass of all six losses through a small fake model with the model.py API.

    python -m pytest -q test_losses.py
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attributes
import losses

# ---------------------------------------------------------------------------------------------------
# Naive helpers: plain Python over lists of floats
# ---------------------------------------------------------------------------------------------------


def naive_log_softmax(row):
    top = max(row)
    log_sum = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_sum for x in row]


def naive_normalize(vector):
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def naive_dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def naive_smoothed_ce(rows, targets, epsilon):
    """(1/N) Σ_n Σ_c −q_nc log softmax(z_n)_c over the given rows; 0 if there are none (E7)."""
    if not rows:
        return 0.0
    total = 0.0
    for z, y in zip(rows, targets):
        log_p = naive_log_softmax(z)
        for c in range(len(z)):
            q = (1 - epsilon) * (1.0 if c == y else 0.0) + epsilon / len(z)
            total += -q * log_p[c]
    return total / len(rows)


def naive_masked_lm(logits, labels):
    """−mean over (b, p) with label ≠ −100 of log softmax(logits[b][p])[label] (E3/E6)."""
    terms = []
    for b in range(len(labels)):
        for p in range(len(labels[b])):
            if labels[b][p] != -100:
                terms.append(-naive_log_softmax(logits[b][p])[labels[b][p]])
    return sum(terms) / len(terms)


def close(tensor, value, tol=1e-9):
    return abs(float(tensor) - value) < tol * max(1.0, abs(value))


# ---------------------------------------------------------------------------------------------------
# Oracle tests, one per equation
# ---------------------------------------------------------------------------------------------------


def test_E1_itc_matches_naive_loop():
    torch.manual_seed(0)
    B, D, tau = 6, 5, 0.07
    image_feat = torch.randn(B, D, dtype=torch.float64)
    text_feat = torch.randn(B, D, dtype=torch.float64)
    pid = torch.tensor([0, 1, 0, 2, 1, 3])
    v = [naive_normalize(r) for r in image_feat.tolist()]
    t = [naive_normalize(r) for r in text_feat.tolist()]
    y = pid.tolist()
    z = [[naive_dot(v[i], t[j]) / tau for j in range(B)] for i in range(B)]
    m = [[1.0 if y[i] == y[j] else 0.0 for j in range(B)] for i in range(B)]
    q = [[m[i][j] / sum(m[i]) for j in range(B)] for i in range(B)]
    i2t = 0.0
    for i in range(B):
        log_p = naive_log_softmax(z[i])
        for j in range(B):
            i2t += -q[i][j] * log_p[j] / B
    t2i = 0.0
    for j in range(B):
        log_p = naive_log_softmax([z[i][j] for i in range(B)])
        for i in range(B):
            t2i += -q[j][i] * log_p[i] / B
    expected = (i2t + t2i) / 2
    assert close(losses.itc_loss(image_feat, text_feat, pid, tau), expected)


def test_E2_itm_matches_naive_loop():
    torch.manual_seed(1)
    B = 4
    logits = torch.randn(3 * B, 2, dtype=torch.float64)
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    expected = sum(-naive_log_softmax(row)[label] for row, label in zip(logits.tolist(), labels.tolist())) / (3 * B)
    assert close(losses.itm_loss(logits, labels), expected)


def test_E3_mlm_matches_naive_loop():
    torch.manual_seed(2)
    B, M, V = 3, 4, 7
    logits = torch.randn(B, M, V, dtype=torch.float64)
    labels = torch.tensor([[1, 5, -100, -100], [0, 0, 6, 2], [3, -100, -100, -100]])
    expected = naive_masked_lm(logits.tolist(), labels.tolist())
    assert close(losses.mlm_loss(logits, labels), expected)


@pytest.mark.parametrize("epsilon", [0.0, 0.4])
def test_E4_iac_matches_naive_loop(epsilon):
    torch.manual_seed(3)
    B, K, D, tau = 5, 3, 4, 0.1
    image_feat = torch.randn(B, D, dtype=torch.float64)
    prompt_feat = torch.randn(2 * K, D, dtype=torch.float64)
    attr_labels = torch.tensor([[1, 0, -1], [0, -1, -1], [-1, 1, -1], [1, 1, -1], [0, -1, -1]])  # k=2 all unknown
    v = [naive_normalize(r) for r in image_feat.tolist()]
    a = [naive_normalize(r) for r in prompt_feat.tolist()]
    labels = attr_labels.tolist()
    total = 0.0
    for k in range(K):
        rows, targets = [], []
        for b in range(B):
            if labels[b][k] != -1:
                rows.append([naive_dot(v[b], a[2 * k]) / tau, naive_dot(v[b], a[2 * k + 1]) / tau])
                targets.append(labels[b][k])
        total += naive_smoothed_ce(rows, targets, epsilon)
    expected = total / K
    got = losses.iac_loss(image_feat, prompt_feat, attr_labels, tau, label_smoothing=epsilon)
    assert close(got, expected)


@pytest.mark.parametrize("epsilon", [0.0, 0.4])
def test_E5_iam_matches_naive_loop(epsilon):
    torch.manual_seed(4)
    S, B = 5, 4
    logits = torch.randn(S * B, 2, dtype=torch.float64)
    targets = torch.tensor([1, 0, -1, 1, -1, -1, -1, -1, 0, 0, 0, 1, 1, -1, 0, -1, 1, 1, 1, 1])  # prompt 1: all −1
    total = 0.0
    for t in range(S):
        rows, labels = [], []
        for b in range(B):
            if targets[t * B + b] != -1:
                rows.append(logits[t * B + b].tolist())
                labels.append(int(targets[t * B + b]))
        total += naive_smoothed_ce(rows, labels, epsilon)
    expected = total / S
    assert close(losses.iam_loss(logits, targets, label_smoothing=epsilon), expected)


def test_E6_mam_matches_naive_loop():
    torch.manual_seed(5)
    R, M, V = 4, 2, 9
    logits = torch.randn(R, M, V, dtype=torch.float64)
    labels = torch.tensor([[3, -100], [0, 8], [-100, -100], [1, 2]])
    expected = naive_masked_lm(logits.tolist(), labels.tolist())
    assert close(losses.mam_loss(logits, labels), expected)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.4])
def test_E7_smoothed_cross_entropy_matches_naive_loop(epsilon):
    torch.manual_seed(6)
    logits = torch.randn(6, 3, dtype=torch.float64)
    target = torch.tensor([2, -1, 0, 1, -1, 2])
    rows = [logits[n].tolist() for n in range(6) if target[n] != -1]
    labels = [int(target[n]) for n in range(6) if target[n] != -1]
    expected = naive_smoothed_ce(rows, labels, epsilon)
    assert close(losses.smoothed_cross_entropy(logits, target, epsilon), expected)
    if epsilon == 0.0:
        plain = F.cross_entropy(logits, target, ignore_index=-1)
        assert torch.allclose(losses.smoothed_cross_entropy(logits, target, 0.0), plain)


# ---------------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------------


def test_itc_unique_pids_equals_infonce():
    torch.manual_seed(7)
    image_feat, text_feat = torch.randn(8, 6), torch.randn(8, 6)
    tau = torch.tensor(0.07)
    z = F.normalize(image_feat, dim=-1) @ F.normalize(text_feat, dim=-1).T / tau
    labels = torch.arange(8)
    infonce = (F.cross_entropy(z, labels) + F.cross_entropy(z.T, labels)) / 2
    assert torch.allclose(losses.itc_loss(image_feat, text_feat, torch.arange(8) * 3, tau), infonce, atol=1e-6)


def test_losses_are_fp32_under_bf16_autocast():
    torch.manual_seed(8)
    image_feat = torch.randn(6, 8).bfloat16()
    text_feat = torch.randn(6, 8).bfloat16()
    pid = torch.arange(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.itc_loss(image_feat, text_feat, pid, 0.07)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, losses.itc_loss(image_feat.float(), text_feat.float(), pid, 0.07))


def test_smoothing_0_4_gives_targets_0_8_and_0_2():
    logits = torch.zeros(2, 2, requires_grad=True)
    losses.smoothed_cross_entropy(logits, torch.tensor([1, 0]), 0.4).backward()
    q = torch.softmax(logits.detach(), dim=1) - 2 * logits.grad  # ∂L/∂z_n = (p_n − q_n) / N, N = 2
    assert torch.allclose(q, torch.tensor([[0.2, 0.8], [0.8, 0.2]]))


def test_smoothed_cross_entropy_is_zero_without_valid_rows():
    logits = torch.randn(3, 2, requires_grad=True)
    loss = losses.smoothed_cross_entropy(logits, torch.full((3,), -1), 0.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros(3, 2))


def test_iac_unknown_labels_never_contribute():
    torch.manual_seed(9)
    image_feat = torch.randn(4, 5, requires_grad=True)
    prompt_feat = torch.randn(6, 5)
    attr_labels = torch.tensor([[1, 0, 1], [-1, -1, -1], [0, 1, -1], [1, -1, 0]])  # image 1 all unknown
    for epsilon in (0.0, 0.4):
        loss = losses.iac_loss(image_feat, prompt_feat, attr_labels, 0.07, epsilon)
        (grad,) = torch.autograd.grad(loss, image_feat)
        assert torch.equal(grad[1], torch.zeros(5))
        changed = image_feat.detach().clone()
        changed[1] = 100.0
        assert torch.allclose(losses.iac_loss(changed, prompt_feat, attr_labels, 0.07, epsilon), loss)


def test_iam_unknown_targets_never_contribute():
    torch.manual_seed(10)
    logits = torch.randn(10, 2, requires_grad=True)
    targets = torch.tensor([1, -1, 0, -1, 1, 0, -1, 1, 1, -1])
    unknown = targets == -1
    for epsilon in (0.0, 0.4):
        loss = losses.iam_loss(logits, targets, epsilon)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad[unknown], torch.zeros(int(unknown.sum()), 2))
        changed = logits.detach().clone()
        changed[unknown] = torch.tensor([1e4, -1e4])
        assert torch.allclose(losses.iam_loss(changed, targets, epsilon), loss)


def test_hard_negatives_never_same_pid_and_seeded():
    torch.manual_seed(11)
    B = 12
    image_feat, text_feat = torch.randn(B, 8), torch.randn(B, 8)
    pid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 6])
    draws = []
    for seed in (0, 0, 1):
        generator = torch.Generator().manual_seed(seed)
        neg_image_idx, neg_text_idx = losses.sample_hard_negatives(image_feat, text_feat, pid, 0.07, generator)
        assert neg_image_idx.shape == neg_text_idx.shape == (B,)
        assert (pid[neg_image_idx] != pid).all() and (pid[neg_text_idx] != pid).all()
        draws.append(torch.cat([neg_image_idx, neg_text_idx]))
    assert torch.equal(draws[0], draws[1])
    for seed in range(50):  # many draws: still never the same identity
        generator = torch.Generator().manual_seed(seed)
        neg_image_idx, neg_text_idx = losses.sample_hard_negatives(image_feat, text_feat, pid, 0.07, generator)
        assert (pid[neg_image_idx] != pid).all() and (pid[neg_text_idx] != pid).all()


def test_hard_negatives_single_identity_fallback_and_batch_of_one():
    generator = torch.Generator().manual_seed(0)
    feat = torch.randn(4, 3)
    neg_image_idx, neg_text_idx = losses.sample_hard_negatives(feat, feat, torch.zeros(4, dtype=torch.long), 0.07,
                                                               generator)
    assert (neg_image_idx != torch.arange(4)).all() and (neg_text_idx != torch.arange(4)).all()
    with pytest.raises(ValueError):
        losses.sample_hard_negatives(feat[:1], feat[:1], torch.zeros(1, dtype=torch.long), 0.07, generator)


def test_iam_prompts_distinct_and_seeded():
    first = losses.sample_iam_prompts(54, torch.Generator().manual_seed(3))
    again = losses.sample_iam_prompts(54, torch.Generator().manual_seed(3))
    assert first.shape == (5,) and len(set(first.tolist())) == 5 and 0 <= first.min() and first.max() < 54
    assert torch.equal(first, again)
    with pytest.raises(ValueError):
        losses.sample_iam_prompts(4, torch.Generator())


def test_mam_picks_only_true_images():
    m = torch.tensor([[1, 0, -1, 0],
                      [0, 1, -1, 0],
                      [1, 0, -1, 0],
                      [-1, -1, -1, 0]])  # prompts 2 and 3 have no true image
    seen = set()
    for seed in range(40):
        prompt_idx, image_idx = losses.sample_mam_images(m, torch.Generator().manual_seed(seed))
        assert prompt_idx.tolist() == [0, 1]
        assert (m[image_idx, prompt_idx] == 1).all()
        seen.add(int(image_idx[0]))
    assert seen == {0, 2}  # both true images of prompt 0 get drawn
    a = losses.sample_mam_images(m, torch.Generator().manual_seed(7))
    b = losses.sample_mam_images(m, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_objective_totals_equal_hand_sums():
    itc, itm, mlm, iac, iam, mam = (torch.tensor(x, dtype=torch.float64) for x in (1.0, 2.0, 3.0, 0.3, 0.6, 0.9))
    pre = losses.pretrain_objective(itc, itm, mlm, iac, iam, mam)  # E8, E9
    assert close(pre["apl"], (0.3 + 0.6 + 0.9) / 3)
    assert close(pre["total"], 1 + 2 + 3 + 0.8 * (0.3 + 0.6 + 0.9) / 3)
    assert set(pre) == {"itc", "itm", "mlm", "iac", "iam", "mam", "apl", "total"}
    ft = losses.finetune_objective(itc, torch.tensor(0.5, dtype=torch.float64), itm, torch.tensor(0.25, dtype=torch.float64), mlm)  # E10–E12
    assert close(ft["total"], (1 + 0.8 * 0.5) + (2 + 0.8 * 0.25) + 3)
    pa = losses.pa100k_objective(iac, iam, mam)  # E13
    assert close(pa["total"], 0.3 + 0.6 + 0.9)


# ---------------------------------------------------------------------------------------------------
# attributes.py: tables, targets, metrics
# ---------------------------------------------------------------------------------------------------


def test_prompt_tables():
    assert len(attributes.MALS_ATTRIBUTES) == 27 and len(attributes.MALS_PROMPTS) == 54
    assert len(attributes.PA100K_ATTRIBUTES) == 26 and len(attributes.PA100K_PROMPTS) == 52
    assert attributes.PROMPT_TABLES == {"mals": attributes.MALS_PROMPTS, "pa100k": attributes.PA100K_PROMPTS}
    mals = attributes.MALS_PROMPTS
    assert mals[0:2] == ("the person is a woman", "the person is a man")
    assert mals[6:8] == ("the person with a hat", "the person without a hat")
    assert mals[18:20] == ("the person wears dress or skirt", "the person wears pants or shorts")
    assert mals[52:54] == ("the person wears brown lower clothes", "the person does not wear brown lower clothes")
    pa = attributes.PA100K_PROMPTS
    assert pa[0:2] == ("the person is a man", "the person is a woman")
    assert pa[5] == "the person is of mid age, between 18 and 60 years old"
    assert pa[16:18] == ("a person without a glasses", "a person with a glasses")
    assert pa[38:40] == ("there is no stripe on the upper clothes of the person",
                         "there is stripe on the upper clothes of the person")  # LowerStripe quirk
    assert pa[50:52] == ("the person does not wear boots", "the person wears boots")
    assert len(set(mals)) == 54 and len(set(pa)) == 52


def test_prompt_targets_tiny_example():
    attr_labels = torch.tensor([[0, 1, -1], [1, -1, 0]])
    expected = torch.tensor([[1, 0, 0, 1, -1, -1], [0, 1, -1, -1, 1, 0]])
    assert torch.equal(attributes.prompt_targets(attr_labels), expected)


def test_attribute_metrics_hand_computed():
    pred = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    gt = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1]])
    # mA: k0 ½(2/3 + 1/1), k1 ½(1/1 + 2/3), k2 ½(2/2 + 1/2)
    ma = ((0.5 * (2 / 3 + 1)) + (0.5 * (1 + 2 / 3)) + (0.5 * (1 + 0.5))) / 3
    # instances: ∩ = 1,2,1,1; ∪ = 2,2,2,2; |P| = 2,2,2,1; |G| = 1,2,1,2
    acc = (1 / 2 + 2 / 2 + 1 / 2 + 1 / 2) / 4
    prec = (1 / 2 + 2 / 2 + 1 / 2 + 1 / 1) / 4
    rec = (1 / 1 + 2 / 2 + 1 / 1 + 1 / 2) / 4
    f1 = 2 * prec * rec / (prec + rec)
    got = attributes.attribute_metrics(pred, gt)
    for name, value in (("mA", ma), ("Acc", acc), ("Prec", prec), ("Rec", rec), ("F1", f1)):
        assert abs(got[name] - 100 * value) < 1e-9, name


def test_attribute_metrics_zero_denominators_are_skipped():
    pred = torch.tensor([[0, 0], [1, 0]])
    gt = torch.tensor([[0, 0], [1, 0]])  # attribute 1 has no positive; instance 0 has nothing at all
    got = attributes.attribute_metrics(pred, gt)
    assert got == {"mA": 100.0, "Acc": 100.0, "Prec": 100.0, "Rec": 100.0, "F1": 100.0}
    with pytest.raises(ValueError):
        attributes.attribute_metrics(pred, torch.tensor([[0, -1], [1, 0]]))


# ---------------------------------------------------------------------------------------------------
# A fake model with the model.py API (PLAN.md), so that these tests do not depend on model.py
# ---------------------------------------------------------------------------------------------------


class FakeAPTM(nn.Module):
    """Random linear layers behind encode_text / text_feat / image_feat / itm_logits / mlm_logits."""

    def __init__(self, vocab_size=30, text_width=16, vision_width=12, embed_dim=8):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, text_width)
        self.text_layer = nn.Linear(text_width, text_width)
        self.cross_layer = nn.Linear(vision_width, text_width)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.mlm_head = nn.Linear(text_width, vocab_size)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def encode_text(self, input_ids, attention_mask):
        return torch.tanh(self.text_layer(self.word_embeddings(input_ids))) * attention_mask[..., None]  # (B, L, Dt)

    def encode_cross(self, text_embeds, text_atts, image_embeds):
        return torch.tanh(text_embeds + self.cross_layer(image_embeds.mean(1))[:, None]) * text_atts[..., None]

    def image_feat(self, image_embeds):
        return self.vision_proj(image_embeds[:, 0])  # (B, D)

    def text_feat(self, text_embeds):
        return self.text_proj(text_embeds[:, 0])  # (B, D)

    def itm_logits(self, text_embeds, text_atts, image_embeds):
        return self.itm_head(self.encode_cross(text_embeds, text_atts, image_embeds)[:, 0]).float()  # (B, 2)

    def mlm_logits(self, input_ids, attention_mask, image_embeds, masked_pos):
        hidden = self.encode_cross(self.encode_text(input_ids, attention_mask), attention_mask, image_embeds)
        hidden = torch.gather(hidden, 1, masked_pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, M, Dt)
        return self.mlm_head(hidden).float()  # (B, M, V)


def fake_batch(B=6, K=4, N=5, vision_width=12, vocab_size=30, L=7, M=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    P = 2 * K
    prompt_ids = torch.randint(1, vocab_size, (P, L), generator=generator)
    prompt_atts = torch.ones(P, L, dtype=torch.long)
    prompt_atts[::2, -2:] = 0
    prompt_masked_pos = torch.randint(1, L, (P, M), generator=generator)
    prompt_masked_labels = torch.gather(prompt_ids, 1, prompt_masked_pos)
    prompt_masked_labels[::3, -1] = -100
    prompt_masked_ids = prompt_ids.scatter(1, prompt_masked_pos, 3)
    return {
        "image_embeds": torch.randn(B, N, vision_width, generator=generator),
        "attr_labels": torch.randint(-1, 2, (B, K), generator=generator),
        "prompt_ids": prompt_ids, "prompt_atts": prompt_atts, "prompt_masked_ids": prompt_masked_ids,
        "prompt_masked_pos": prompt_masked_pos, "prompt_masked_labels": prompt_masked_labels,
    }


def test_attribute_losses_match_official_loops():
    torch.manual_seed(12)
    model, batch = FakeAPTM(), fake_batch()
    image_embeds, attr_labels = batch["image_embeds"], batch["attr_labels"]
    image_feat = model.image_feat(image_embeds)
    got = attributes.attribute_losses(model, image_embeds, image_feat, attr_labels, batch["prompt_ids"],
                                      batch["prompt_atts"], batch["prompt_masked_ids"], batch["prompt_masked_pos"],
                                      batch["prompt_masked_labels"], torch.Generator().manual_seed(5), 0.4)
    # the official code's structure: one cross-encoder call per chosen prompt, one MLM batch of the kept prompts
    generator = torch.Generator().manual_seed(5)
    B, P = image_embeds.shape[0], batch["prompt_ids"].shape[0]
    prompt_embeds = model.encode_text(batch["prompt_ids"], batch["prompt_atts"])
    m = attributes.prompt_targets(attr_labels)
    iam = 0.0
    for t in losses.sample_iam_prompts(P, generator).tolist():
        logits = model.itm_logits(prompt_embeds[t].repeat(B, 1, 1), batch["prompt_atts"][t].repeat(B, 1), image_embeds)
        iam = iam + losses.smoothed_cross_entropy(logits, m[:, t], 0.4)
    prompt_idx, image_idx = losses.sample_mam_images(m, generator)
    assert (m[image_idx, prompt_idx] == 1).all()
    mam_logits = model.mlm_logits(batch["prompt_masked_ids"][prompt_idx], batch["prompt_atts"][prompt_idx],
                                  image_embeds[image_idx], batch["prompt_masked_pos"][prompt_idx])
    iac = losses.iac_loss(image_feat, model.text_feat(prompt_embeds), attr_labels, model.temp, 0.4)
    assert torch.allclose(got["iac"], iac)
    assert torch.allclose(got["iam"], iam / 5)
    assert torch.allclose(got["mam"], losses.mam_loss(mam_logits, batch["prompt_masked_labels"][prompt_idx]))


def test_forward_backward_all_six_losses():
    torch.manual_seed(13)
    model, batch = FakeAPTM(), fake_batch(B=8)
    generator = torch.Generator().manual_seed(0)
    B, L, M = 8, 9, 3
    pid = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    text_ids = torch.randint(1, 30, (B, L))
    text_atts = torch.ones(B, L, dtype=torch.long)
    image_embeds = batch["image_embeds"].requires_grad_()
    text_embeds = model.encode_text(text_ids, text_atts)
    image_feat, text_feat = model.image_feat(image_embeds), model.text_feat(text_embeds)
    itc = losses.itc_loss(image_feat, text_feat, pid, model.temp)
    neg_image_idx, neg_text_idx = losses.sample_hard_negatives(image_feat, text_feat, pid, model.temp, generator)
    itm_logits = model.itm_logits(torch.cat([text_embeds, text_embeds, text_embeds[neg_text_idx]]),
                                  torch.cat([text_atts, text_atts, text_atts[neg_text_idx]]),
                                  torch.cat([image_embeds, image_embeds[neg_image_idx], image_embeds]))
    itm = losses.itm_loss(itm_logits, torch.cat([torch.ones(B), torch.zeros(2 * B)]).long())
    masked_pos = torch.randint(1, L, (B, M))
    mlm = losses.mlm_loss(model.mlm_logits(text_ids, text_atts, image_embeds, masked_pos),
                          torch.gather(text_ids, 1, masked_pos))
    attr = attributes.attribute_losses(model, image_embeds, image_feat, batch["attr_labels"], batch["prompt_ids"],
                                       batch["prompt_atts"], batch["prompt_masked_ids"], batch["prompt_masked_pos"],
                                       batch["prompt_masked_labels"], generator, label_smoothing=0.4)
    objective = losses.pretrain_objective(itc, itm, mlm, **attr)
    objective["total"].backward()
    assert all(torch.isfinite(value) for value in objective.values())
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert image_embeds.grad.abs().sum() > 0


def test_predict_attributes_matches_per_image_loop_and_chunking():
    torch.manual_seed(14)
    model, batch = FakeAPTM(), fake_batch(B=5, K=4)
    prompt_embeds = model.encode_text(batch["prompt_ids"], batch["prompt_atts"])
    image_embeds = batch["image_embeds"]
    pred = attributes.predict_attributes(model, image_embeds, prompt_embeds, batch["prompt_atts"])
    assert pred.shape == (5, 4) and pred.dtype == torch.long
    for b in range(5):  # the official loop: one image against all prompts
        s = model.itm_logits(prompt_embeds, batch["prompt_atts"], image_embeds[b].repeat(8, 1, 1))[:, 1]
        for k in range(4):
            assert pred[b, k] == (1 if s[2 * k + 1] > s[2 * k] else 0)
    small_chunks = attributes.predict_attributes(model, image_embeds, prompt_embeds, batch["prompt_atts"],
                                                 pair_batch_size=3)
    assert torch.equal(pred, small_chunks)


def test_predict_attributes_ties_go_to_label_0():
    class ConstantITM(FakeAPTM):
        def itm_logits(self, text_embeds, text_atts, image_embeds):
            return torch.zeros(text_embeds.shape[0], 2)

    model, batch = ConstantITM(), fake_batch(B=3, K=4)
    prompt_embeds = model.encode_text(batch["prompt_ids"], batch["prompt_atts"])
    pred = attributes.predict_attributes(model, batch["image_embeds"], prompt_embeds, batch["prompt_atts"])
    assert torch.equal(pred, torch.zeros(3, 4, dtype=torch.long))
