"""Tests for evaluate.py (spec §6): metrics against hand-computed values and a naive per-query loop, the
four fusion rules, batching independence of the ITM re-rank, and the command line. CPU, offline, fast."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate


# -----------------------------------------------------------------------------
# Metrics (spec §6.3)

def scores_from_rankings(rankings, num_gallery):
    """Score matrix whose descending order of row q is rankings[q] (gallery indices, best first)."""
    scores = torch.zeros(len(rankings), num_gallery)
    for q, ranking in enumerate(rankings):
        scores[q, torch.tensor(ranking)] = torch.arange(num_gallery, 0, -1, dtype=torch.float32)
    return scores


def ranking_with_matches(g_pids, pid, match_ranks):
    """A ranking of the gallery whose images with `pid` sit exactly at the 1-based `match_ranks`."""
    matches = [j for j, p in enumerate(g_pids) if p == pid]
    others = [j for j, p in enumerate(g_pids) if p != pid]
    assert len(matches) == len(match_ranks)
    ranking, matches_left = [], iter(matches)
    for r in range(1, len(g_pids) + 1):
        ranking.append(next(matches_left) if r in match_ranks else others.pop(0))
    return ranking


def test_retrieval_metrics_hand_computed():
    g_pids = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5]  # G = 12
    # (query pid, 1-based ranks of its matches): several matches per query, matches at the very end
    queries = [(0, [2, 3, 12]), (2, [7, 9, 11, 12]), (5, [1]), (1, [11, 12])]
    scores = scores_from_rankings([ranking_with_matches(g_pids, p, r) for p, r in queries], len(g_pids))
    metrics = evaluate.retrieval_metrics(scores, [p for p, _ in queries], g_pids)
    ap = [(1 / 2 + 2 / 3 + 3 / 12) / 3, (1 / 7 + 2 / 9 + 3 / 11 + 4 / 12) / 4, 1.0, (1 / 11 + 2 / 12) / 2]
    inp = [3 / 12, 4 / 12, 1 / 1, 2 / 12]  # |G_q| / rank of the last match
    assert metrics["R1"] == pytest.approx(100 * 1 / 4)
    assert metrics["R5"] == pytest.approx(100 * 2 / 4)
    assert metrics["R10"] == pytest.approx(100 * 3 / 4)
    assert metrics["mAP"] == pytest.approx(100 * sum(ap) / 4, abs=1e-4)
    assert metrics["mINP"] == pytest.approx(100 * sum(inp) / 4, abs=1e-4)


def test_retrieval_metrics_string_pids_and_small_gallery():
    # G < 10: R@5 and R@10 look at the whole gallery; pids may be strings (ICFG folders)
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    metrics = evaluate.retrieval_metrics(scores, ["b", "a"], ["a", "b", "a"])
    # query 0 (b): ranking a, a, b → match at 3; query 1 (a): ranking b, a, a → matches at 2, 3
    assert metrics["R1"] == 0 and metrics["R5"] == 100 and metrics["R10"] == 100
    assert metrics["mAP"] == pytest.approx(100 * (1 / 3 + (1 / 2 + 2 / 3) / 2) / 2, abs=1e-4)
    assert metrics["mINP"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2, abs=1e-4)


def test_retrieval_metrics_no_match_raises():
    with pytest.raises(ValueError):
        evaluate.retrieval_metrics(torch.rand(2, 3), [0, 7], [0, 1, 1])


def naive_metrics(scores, q_pids, g_pids):
    """Spec §6.3 written as a loop over queries and ranks."""
    r1 = r5 = r10 = ap_sum = inp_sum = 0.0
    for q in range(scores.shape[0]):
        order = np.argsort(-scores[q], kind="stable")
        match = [g_pids[j] == q_pids[q] for j in order]
        num_rel, found, ap, last = sum(match), 0, 0.0, 0
        for r, m in enumerate(match, start=1):
            if m:
                found += 1
                ap += found / r
                last = r
        first = match.index(True) + 1
        r1, r5, r10 = r1 + (first <= 1), r5 + (first <= 5), r10 + (first <= 10)
        ap_sum += ap / num_rel
        inp_sum += num_rel / last
    n = scores.shape[0]
    return {"R1": 100 * r1 / n, "R5": 100 * r5 / n, "R10": 100 * r10 / n, "mAP": 100 * ap_sum / n,
            "mINP": 100 * inp_sum / n}


@pytest.mark.parametrize("integer_scores", [False, True])  # True: many ties
def test_retrieval_metrics_matches_naive_loop(integer_scores):
    rng = np.random.default_rng(0)
    g_pids = rng.integers(0, 15, size=60)
    q_pids = rng.choice(np.unique(g_pids), size=37)
    scores = rng.integers(0, 5, size=(37, 60)) if integer_scores else rng.standard_normal((37, 60))
    scores = scores.astype(np.float32)
    expected = naive_metrics(scores, q_pids, g_pids)
    for chunk_size in (37, 8, 1):
        metrics = evaluate.retrieval_metrics(torch.from_numpy(scores), q_pids, g_pids, chunk_size=chunk_size)
        for key in expected:
            assert metrics[key] == pytest.approx(expected[key], abs=1e-4), (key, chunk_size)


# -----------------------------------------------------------------------------
# Fusion (spec §6.2)

def random_rerank_problem(num_queries=10, num_gallery=30, k=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sim = torch.rand(num_queries, num_gallery, generator=generator) * 2 - 1  # (Q, G)
    topk_idx = sim.topk(k, dim=1).indices  # (Q, k)
    itm = torch.randn(num_queries, k, generator=generator) * 5  # (Q, k)
    return sim, topk_idx, itm


def test_fusion_itc_is_similarity_order():
    sim, topk_idx, itm = random_rerank_problem()
    fused = evaluate.fuse_scores(sim, topk_idx, itm, "itc")
    assert torch.equal(fused.argsort(1, descending=True), sim.argsort(1, descending=True))


@pytest.mark.parametrize("mode", ["itm", "aptm", "aptm4"])
def test_fusion_top_k_ordered_by_itm_and_above_the_rest(mode):
    sim, topk_idx, itm = random_rerank_problem()
    fused = evaluate.fuse_scores(sim, topk_idx, itm, mode)
    k = topk_idx.shape[1]
    ranking = fused.argsort(1, descending=True)  # (Q, G)
    expected_top = topk_idx.gather(1, itm.argsort(1, descending=True))  # (Q, k) candidates by ITM
    if mode == "aptm4":  # the 4-GPU quirk weights ITC ~200× more: same candidates, order may differ
        assert torch.equal(ranking[:, :k].sort(1).values, expected_top.sort(1).values)
    else:
        assert torch.equal(ranking[:, :k], expected_top)
    if mode != "itm":  # non-candidates: ordered by ITC (in "itm" they tie at −1000)
        rest = ranking[:, k:]
        rest_sim = sim.gather(1, rest)
        assert torch.all(rest_sim[:, :-1] >= rest_sim[:, 1:])


def test_fusion_aptm_formula():
    sim, topk_idx, itm = random_rerank_problem()
    M = torch.full_like(sim, 1000.0).scatter_(1, topk_idx, itm)
    M = torch.where(M == 1000.0, itm.min(1, keepdim=True).values, M)
    expected = (M - M.min()) / (M.max() - M.min()) + 0.002 * (sim - sim.min()) / (sim.max() - sim.min())
    torch.testing.assert_close(evaluate.fuse_scores(sim, topk_idx, itm, "aptm"), expected)


def released_code_on_ranks(sim, topk_idx, itm, world_size):
    """The released reTools.py: evaluation, transcribed: every rank fills its block of rows, replaces the
    1000 sentinels by row minima, min-max normalises both matrices, then the ranks' matrices are summed."""
    num_queries = sim.shape[0]
    step = num_queries // world_size + 1
    total = torch.zeros_like(sim)
    for rank in range(world_size):
        score = torch.full_like(sim, 1000.0)
        for i in range(rank * step, min(num_queries, rank * step + step)):
            score[i, topk_idx[i]] = itm[i]
        min_values = score.min(1).values.view(-1, 1).expand(-1, score.size(1))
        score[score == 1000.0] = min_values[score == 1000.0]
        score_sim = (sim - sim.min()) / (sim.max() - sim.min())
        score = (score - score.min()) / (score.max() - score.min())
        total += score + 0.002 * score_sim
    return total


def test_fusion_aptm_equals_released_code_on_one_rank():
    sim, topk_idx, itm = random_rerank_problem()
    torch.testing.assert_close(evaluate.fuse_scores(sim, topk_idx, itm, "aptm"),
                               released_code_on_ranks(sim, topk_idx, itm, 1))


@pytest.mark.parametrize("num_queries", [13, 16])  # blocks of 4 rows (last one 1 row) and of 5 (last 1)
def test_fusion_aptm4_formula_and_released_code(num_queries):
    sim, topk_idx, itm = random_rerank_problem(num_queries=num_queries)
    fused = evaluate.fuse_scores(sim, topk_idx, itm, "aptm4")
    # spec §6.2: row i owned by rank r → (M_ij − m_r)/(1000 − m_r) + (W − 1) + W·0.002·S̄_ij
    W, step = 4, num_queries // 4 + 1
    M = torch.full_like(sim, 1000.0).scatter_(1, topk_idx, itm)
    M = torch.where(M == 1000.0, itm.min(1, keepdim=True).values, M)
    S_bar = (sim - sim.min()) / (sim.max() - sim.min())
    expected = torch.empty_like(sim)
    for r in range(W):
        rows = slice(r * step, min(num_queries, (r + 1) * step))
        m_r = itm[rows].min()
        expected[rows] = (M[rows] - m_r) / (1000 - m_r) + (W - 1) + W * 0.002 * S_bar[rows]
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(fused, released_code_on_ranks(sim, topk_idx, itm, W))


def test_fusion_rejects_unknown_mode():
    sim, topk_idx, itm = random_rerank_problem()
    with pytest.raises(ValueError):
        evaluate.fuse_scores(sim, topk_idx, itm, "sum")


# -----------------------------------------------------------------------------
# Re-ranking with a fake model implementing the model.py API

class FakeModel(torch.nn.Module):
    """encode_image / encode_text / encode_cross / itm_logits / image_feat / text_feat with the shapes of
    model.APTM; the [CLS] output of encode_cross sees every unpadded text token. No key/value cache."""

    def __init__(self, vocab=50, dv=12, dt=16, d=8, num_tokens=5):
        super().__init__()
        self.vision = torch.nn.Linear(3, dv)
        self.image_pos = torch.nn.Parameter(torch.randn(num_tokens, dv))
        self.word = torch.nn.Embedding(vocab, dt)
        self.vision_proj, self.text_proj = torch.nn.Linear(dv, d), torch.nn.Linear(dt, d)
        self.key, self.value = torch.nn.Linear(dv, dt), torch.nn.Linear(dv, dt)
        self.itm_head = torch.nn.Linear(dt, 2)

    def encode_image(self, images):  # (B, 3, H, W) → (B, N, Dv)
        return torch.tanh(self.vision(images.mean((2, 3)))[:, None] + self.image_pos)

    def encode_text(self, input_ids, attention_mask):  # → (B, L, Dt)
        return self.word(input_ids) * attention_mask[..., None]

    def image_feat(self, image_embeds):
        return self.vision_proj(image_embeds[:, 0])

    def text_feat(self, text_embeds):
        return self.text_proj(text_embeds[:, 0])

    def encode_cross(self, text_embeds, text_atts, image_embeds, image_kv=None):
        key, value = image_kv[0] if image_kv is not None else (self.key(image_embeds), self.value(image_embeds))
        text = (text_embeds * text_atts[..., None]).sum(1) / text_atts.sum(1, keepdim=True)  # (B, Dt)
        attn = torch.softmax(torch.einsum("bd,bnd->bn", text, key), dim=-1)  # (B, N)
        cls = torch.tanh(text + torch.einsum("bn,bnd->bd", attn, value))  # (B, Dt)
        return torch.cat([cls[:, None], text_embeds[:, 1:]], 1)  # (B, L, Dt)

    def itm_logits(self, text_embeds, text_atts, image_embeds=None, image_kv=None):
        return self.itm_head(self.encode_cross(text_embeds, text_atts, image_embeds, image_kv)[:, 0]).float()


class FakeModelCached(FakeModel):
    """The same model with a per-layer (key, value) cache (one layer here)."""

    def cross_kv(self, image_embeds):
        return [(self.key(image_embeds), self.value(image_embeds))]


def encoded_problem(model, num_queries=12, num_gallery=20, max_tokens=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_gallery, 3, 8, 4, generator=generator)
    lengths = torch.randint(2, max_tokens + 1, (num_queries,), generator=generator)
    text_atts = (torch.arange(max_tokens) < lengths[:, None]).long()  # (Q, L), [CLS] + pieces, then pad
    input_ids = torch.randint(1, 50, (num_queries, max_tokens), generator=generator) * text_atts
    with torch.no_grad():
        image_embeds = model.encode_image(images)
        text_embeds = model.encode_text(input_ids, text_atts)
        image_feat = F.normalize(model.image_feat(image_embeds), dim=-1)
        text_feat = F.normalize(model.text_feat(text_embeds), dim=-1)
    return text_embeds, text_atts, text_feat, image_embeds, image_feat


def test_itm_rerank_matches_one_query_at_a_time():
    torch.manual_seed(0)
    model = FakeModelCached().eval()
    text_embeds, text_atts, text_feat, image_embeds, image_feat = encoded_problem(model)
    topk_idx = (text_feat @ image_feat.t()).topk(6, dim=1).indices  # (Q, k)
    itm = evaluate.itm_rerank(model, text_embeds, text_atts, image_embeds, topk_idx, pair_batch=10,
                              progress=False)
    with torch.no_grad():  # the released loop: one query, its k images, full padded length
        expected = torch.stack([model.itm_logits(text_embeds[i].repeat(6, 1, 1), text_atts[i].repeat(6, 1),
                                                 image_embeds[topk_idx[i]])[:, 1] for i in range(len(topk_idx))])
    torch.testing.assert_close(itm, expected)


def test_itm_rerank_without_cross_kv_cache_gives_same_logits():
    torch.manual_seed(0)
    cached = FakeModelCached().eval()
    plain = FakeModel().eval()
    plain.load_state_dict(cached.state_dict())
    problem = encoded_problem(cached)
    topk_idx = (problem[2] @ problem[4].t()).topk(6, dim=1).indices
    args = (problem[0], problem[1], problem[3], topk_idx)
    torch.testing.assert_close(evaluate.itm_rerank(cached, *args, pair_batch=7, progress=False),
                               evaluate.itm_rerank(plain, *args, pair_batch=7, progress=False))


@pytest.mark.parametrize("fusion", evaluate.FUSION_MODES)
def test_rank_gallery_independent_of_query_chunks(fusion):
    torch.manual_seed(0)
    model = FakeModelCached().eval()
    problem = encoded_problem(model, num_queries=12)
    k = 8
    one_chunk, _ = evaluate.rank_gallery(model, *problem, k_rerank=k, fusion=fusion, pair_batch=12 * k,
                                         progress=False)
    four_chunks, _ = evaluate.rank_gallery(model, *problem, k_rerank=k, fusion=fusion, pair_batch=3 * k,
                                           progress=False)
    # fusion and metrics see whole matrices; the logits may differ by float rounding only, since each
    # ITM batch is cut to its longest text (3e-8 here)
    torch.testing.assert_close(one_chunk, four_chunks, rtol=0, atol=1e-6)
    q_pids = torch.arange(12) % 5
    g_pids = torch.arange(20) % 5
    assert evaluate.retrieval_metrics(one_chunk, q_pids, g_pids) == \
        evaluate.retrieval_metrics(four_chunks, q_pids, g_pids, chunk_size=3)


def test_rank_gallery_k_larger_than_gallery():
    torch.manual_seed(0)
    model = FakeModelCached().eval()
    problem = encoded_problem(model, num_queries=4, num_gallery=5)
    scores, _ = evaluate.rank_gallery(model, *problem, k_rerank=128, fusion="aptm", progress=False)
    assert scores.shape == (4, 5) and torch.isfinite(scores).all()


# -----------------------------------------------------------------------------
# End to end on a tiny synthetic world (CUHK-PEDES format) and a tiny-preset checkpoint

@pytest.fixture(scope="module")
def world_and_ckpt(tmp_path_factory):
    from dataclasses import asdict, replace

    import data
    from model import APTM, CONFIGS
    root = tmp_path_factory.mktemp("eval")
    paths = data.make_synthetic(str(root / "world"), mals_ids=2, mals_images_per_id=1, train_ids=2, val_ids=2,
                                test_ids=3, images_per_id=2, attr_train=2, attr_test=2, workers=1)
    cuhk = str(root / "world" / "cuhk")
    tokenizer = data.Tokenizer.from_corpus(data.load_retrieval("cuhk", cuhk, "test").captions)
    config = replace(CONFIGS["tiny"], vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = APTM(config)
    ckpt = str(root / "ckpt.pt")
    torch.save({"model": model.state_dict(), "config": asdict(config), "tokenizer": tokenizer.state()}, ckpt)
    official = str(root / "official.pth")  # no tokenizer, like a released checkpoint
    torch.save({"model": model.state_dict(), "config": asdict(config)}, official)
    return {"root": root, "cuhk": cuhk, "images": paths["cuhk_root"], "ckpt": ckpt, "official": official,
            "tokenizer": tokenizer}


def test_evaluate_retrieval_fake_model_itc_equals_plain_similarity(world_and_ckpt):
    import data
    torch.manual_seed(0)
    model = FakeModelCached(vocab=world_and_ckpt["tokenizer"].vocab_size)
    testset = data.load_retrieval("cuhk", world_and_ckpt["cuhk"], "test")
    kwargs = dict(image_size=(16, 8), normalization=data.NORMALIZATION["cuhk"], max_tokens=12, num_workers=0,
                  progress=False)
    result = evaluate.evaluate_retrieval(model, world_and_ckpt["tokenizer"], testset, "cpu", k_rerank=128,
                                         fusion="itc", **kwargs)
    image_embeds, image_feat = evaluate.encode_images(model, testset.image_paths, "cpu", (16, 8),
                                                      data.NORMALIZATION["cuhk"], num_workers=0, progress=False)
    _, _, text_feat = evaluate.encode_texts(model, world_and_ckpt["tokenizer"], testset.captions, "cpu", 12,
                                            progress=False)
    expected = evaluate.retrieval_metrics(text_feat @ image_feat.t(), testset.q_pids, testset.g_pids)
    assert {k: result[k] for k in expected} == expected
    assert {"time_features", "time_itm", "time_total"} <= set(result)
    reranked = evaluate.evaluate_retrieval(model, world_and_ckpt["tokenizer"], testset, "cpu", k_rerank=3,
                                           fusion="aptm", **kwargs)
    assert all(0 <= reranked[k] <= 100 for k in expected)


def test_main_evaluates_a_checkpoint(world_and_ckpt, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    result = evaluate.main(["--ckpt", world_and_ckpt["ckpt"], "--dataset", "cuhk", "--data-root",
                            world_and_ckpt["cuhk"], "--k-rerank", "4", "--num-workers", "0", "--json", str(out)])
    assert result["queries"] == 12 and result["gallery"] == 6
    assert all(0 <= result[k] <= 100 for k in ("R1", "R5", "R10", "mAP", "mINP"))
    assert result["R10"] == 100.0  # the gallery has 6 images
    import json
    assert json.loads(out.read_text())["mAP"] == pytest.approx(result["mAP"])
    assert "mINP" in capsys.readouterr().out


def test_main_search_dataset_caption_marks_results(world_and_ckpt, tmp_path, capsys):
    from PIL import Image
    png = tmp_path / "search.png"
    evaluate.main(["--ckpt", world_and_ckpt["ckpt"], "--dataset", "cuhk", "--data-root", world_and_ckpt["cuhk"],
                   "--query-index", "0", "--top", "3", "--num-workers", "0", "--out", str(png)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().endswith(("right", "wrong"))]
    assert len(lines) == 3
    with Image.open(png) as image:
        assert image.width > 3 * 96


def test_main_search_free_text_over_a_folder(world_and_ckpt, tmp_path, capsys):
    png = tmp_path / "search.png"
    evaluate.main(["--ckpt", world_and_ckpt["ckpt"], "--images", world_and_ckpt["images"], "--query",
                   "a man in a blue top and brown trousers", "--top", "2", "--num-workers", "0", "--out", str(png)])
    assert png.is_file()
    assert ".jpg" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--query", "a man", "--query-index", "0"], "not both"),
    (["--pid", "3"], "search mode"),
    (["--k-rerank", "0"], "≥ 1"),
    (["--query-index", "0", "--pid", "3"], "free-text"),
    (["--images", "no/such/folder", "--query", "a man"], "not a folder"),
])
def test_main_bad_arguments_exit_2(world_and_ckpt, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--ckpt", world_and_ckpt["ckpt"]] + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_main_missing_files_exit_2(world_and_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--ckpt", str(tmp_path / "missing.pt")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:  # an official checkpoint carries no tokenizer
        evaluate.main(["--ckpt", world_and_ckpt["official"], "--dataset", "cuhk", "--data-root",
                       world_and_ckpt["cuhk"]])
    assert exit_info.value.code == 2
    assert "--bert" in capsys.readouterr().err
