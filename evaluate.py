"""Text-to-image person retrieval evaluation and free-text search for minAPTM (spec §6).

Two-stage ranking as in the official reTools.py: evaluation
  1. ITC: S = cosine similarity of the normalised projections, no temperature (spec §6.1);
  2. the top-k (128) images of every query are re-scored by the ITM head's raw match logit (index 1),
     computed for many (query, image) pairs per forward pass (spec §6.2);
  3. the fused score F ranks the whole gallery; R1/R5/R10/mAP/mINP as spec §6.3.

Fusion modes (spec §6.2):
  aptm   the released code on one GPU: F = minmax(M) + 0.002 · minmax(S), where M holds the ITM logits of
         the top-k and every other entry of a row is that row's smallest ITM logit.
  aptm4  the released code run on 4 GPUs, as the published runs were: row i in rank r's block gets
         (M_ij − m_r)/(1000 − m_r) + 3 + 4 · 0.002 · minmax(S)_ij.
  itm    the first release: top-k get the raw ITM logit, all other images −1000.
  itc    no re-ranking: F = S.
Which rule produced the published numbers is open (spec §10.3): the paper predates the 2023-08-12 change to
reTools.py, so `itm` probably did; R@K should differ by ±0.1–0.3 between the rules, mAP/mINP by more.

Commands:
  python evaluate.py --ckpt out/finetune/ckpt.pt                            # synthetic test split
  python evaluate.py --ckpt checkpoint_best.pth --bert data/bert-base-uncased \
      --dataset cuhk --data-root data/CUHK-PEDES --fusion aptm4 --dtype float32 --json out/cuhk.json
  python evaluate.py --ckpt out/finetune/ckpt.pt --query "a woman in a red coat with a black backpack"
  python evaluate.py --ckpt out/finetune/ckpt.pt --query-index 7 --out out/search.png
  python evaluate.py --ckpt out/finetune/ckpt.pt --images my_photos/ --query "a man in a blue shirt"
  python evaluate.py --oracle                       # the attribute oracle: captions alone, no model

Letters: Q queries (texts), G gallery images, k re-ranked images per query, P pairs in one ITM batch,
L text tokens, N image tokens, Dv vision width, Dt text width, D projection width.
"""
import argparse
import json
import os
import textwrap
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import synthetic
from model import amp_dtype, autocast_for

FUSION_MODES = ("aptm", "aptm4", "itm", "itc")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype: autocast dtype (model.amp_dtype)
ITC_WEIGHT = 0.002         # weight of minmax(S) in the fused score [reTools.py: evaluation], spec §6.2
SENTINEL = 1000.0          # the released code's "not re-ranked" marker [reTools.py], spec §6.2
NUM_GPUS_RELEASED = 4      # world size of the official runs (spec §5.3), emulated by fusion "aptm4"
ORIGINAL_FILL = -1000.0    # score of non-candidates in the first release (8be062b), spec §6.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# -----------------------------------------------------------------------------
# Metrics (spec §6.3)

def _pid_codes(q_pids, g_pids):
    """Map query and gallery pids (ints or strings) to shared integer codes."""
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    _, codes = np.unique(np.concatenate([q_pids.astype(str), g_pids.astype(str)]), return_inverse=True)
    codes = torch.from_numpy(codes.astype(np.int64))
    return codes[:len(q_pids)], codes[len(q_pids):]  # (Q,), (G,)


def retrieval_metrics(scores, q_pids, g_pids, chunk_size=256):
    """R1, R5, R10, mAP, mINP in percent for text→image retrieval, spec §6.3 [reTools.py: mAP].

    scores (Q, G): higher = better. A hit is any gallery image whose pid equals the query's pid.
    Each query ranks the whole gallery; ties are broken by gallery order (a stable sort; our choice,
    the official torch.argsort leaves them unordered). Queries are processed `chunk_size` at a time,
    so memory is O(chunk_size · G); nothing of size Q × G is copied.
      R@K  = 100 · mean_q 1[some match in the first K]
      AP_q = (1/|G_q|) Σ_r match_q(r) · (Σ_{r'≤r} match_q(r')) / r,     mAP = 100 · mean_q AP_q
      INP_q = |G_q| / (rank of the last match),                         mINP = 100 · mean_q INP_q
    """
    num_queries, num_gallery = scores.shape
    q_codes, g_codes = _pid_codes(q_pids, g_pids)
    if len(q_codes) != num_queries or len(g_codes) != num_gallery:
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(q_codes)} query and "
                         f"{len(g_codes)} gallery pids")
    q_codes, g_codes = q_codes.to(scores.device), g_codes.to(scores.device)
    ranks = torch.arange(1, num_gallery + 1, device=scores.device, dtype=torch.float32)  # (G,)
    hit_cols = [min(k, num_gallery) - 1 for k in (1, 5, 10)]
    per_query = []  # (C, 5) per chunk: hit@1, hit@5, hit@10, AP, INP
    for start in range(0, num_queries, chunk_size):
        rows = slice(start, start + chunk_size)
        order = torch.sort(scores[rows], dim=1, descending=True, stable=True).indices  # (C, G)
        match = g_codes[order] == q_codes[rows, None]  # (C, G) bool
        cum_match = match.cumsum(1, dtype=torch.int32)  # (C, G): Σ_{r'≤r} match(r')
        num_rel = cum_match[:, -1]  # (C,) |G_q|
        if bool((num_rel == 0).any()):
            raise ValueError("a query has no gallery image with its pid (spec §6.3 assumes ≥ 1 match)")
        hits = (cum_match[:, hit_cols] > 0).float()  # (C, 3)
        ap = (match * (cum_match / ranks)).sum(1) / num_rel  # (C,)
        last_rank = torch.where(match, ranks, 0.0).amax(1)  # (C,) R_q^hard
        inp = num_rel / last_rank  # (C,)
        per_query.append(torch.cat([hits, ap[:, None], inp[:, None]], 1).cpu())  # (C, 5)
    values = (100.0 * torch.cat(per_query).double().mean(0)).tolist()  # (5,)
    return dict(zip(("R1", "R5", "R10", "mAP", "mINP"), values))


# -----------------------------------------------------------------------------
# Fusion of ITC and ITM scores (spec §6.2)

def fuse_scores(sim, topk_idx, itm, mode="aptm"):
    """Final score matrix F (Q, G) from S = sim (Q, G), the re-ranked images topk_idx (Q, k) and their
    raw ITM match logits itm (Q, k). Each entry depends only on the whole matrices passed in, never on
    how the queries were batched. Modes: see the module docstring and spec §6.2.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion {mode!r}; choose from {FUSION_MODES}")
    sim = sim.float()
    if mode == "itc":
        return sim.clone()
    itm = itm.float()
    if mode == "itm":  # first release: M initialised to −1000, top-k get the raw logit
        return torch.full_like(sim, ORIGINAL_FILL).scatter_(1, topk_idx, itm)
    # HEAD rule, steps 1–2: sentinel entries take their row's smallest ITM logit
    M = itm.amin(1, keepdim=True).expand_as(sim).clone().scatter_(1, topk_idx, itm)  # (Q, G)
    # step 4: S̄ = minmax(S) over the whole matrix (the guards only matter for constant inputs)
    S_bar = (sim - sim.min()).div_((sim.max() - sim.min()).clamp_min(1e-12))  # (Q, G)
    if mode == "aptm":
        # steps 3, 5: M̄ = minmax(M) over the whole matrix; F = M̄ + 0.002·S̄
        M_bar = M.sub_(itm.min()).div_((itm.max() - itm.min()).clamp_min(1e-12))  # (Q, G)
        return M_bar.add_(S_bar, alpha=ITC_WEIGHT)
    # aptm4: W ranks own contiguous blocks of ⌊Q/W⌋+1 rows; each normalises with its own minimum m_r
    # and max 1000 (the other ranks' rows still hold the sentinel), then the W matrices are summed.
    # A rank left without rows (small Q, e.g. Q = 6) makes the released code NaN; here it is simply absent.
    W = NUM_GPUS_RELEASED
    num_queries = sim.shape[0]
    rank = torch.arange(num_queries, device=sim.device) // (num_queries // W + 1)  # (Q,)
    m = torch.full((W,), float("inf"), device=sim.device).scatter_reduce(0, rank, itm.amin(1), "amin")  # (W,)
    m_row = m[rank][:, None]  # (Q, 1) m_r of the row's rank
    return M.sub_(m_row).div_(SENTINEL - m_row).add_(S_bar, alpha=W * ITC_WEIGHT).add_(W - 1)


# -----------------------------------------------------------------------------
# Features and re-ranking (spec §6.1, §6.2)

@torch.inference_mode()
def encode_images(model, image_paths, device, image_size, normalization, batch_size=64, num_workers=None,
                  progress=True, dtype="auto"):
    """image_embeds (G, N, Dv) kept on `device` in the autocast dtype; image_feat (G, D) normalised fp32."""
    dataset = data.ImageDataset(image_paths, data.test_transform(image_size, normalization))
    num_workers = data.default_workers(device) if num_workers is None else num_workers
    loader = data.Loader(dataset, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=torch.device(device).type == "cuda")
    image_embeds, image_feat = [], []
    for batch in tqdm(loader, desc="images", disable=not progress, leave=False):
        with autocast_for(device, dtype):
            embeds = model.encode_image(batch["image"].to(device, non_blocking=True))  # (B, N, Dv)
            feat = model.image_feat(embeds)  # (B, D)
        image_embeds.append(embeds.to(amp_dtype(device, dtype) or torch.float32))
        image_feat.append(F.normalize(feat.float(), dim=-1))
    return torch.cat(image_embeds), torch.cat(image_feat)


@torch.inference_mode()
def encode_texts(model, tokenizer, captions, device, max_tokens, batch_size=256, progress=True, dtype="auto"):
    """text_embeds (Q, L, Dt) in the autocast dtype, text_atts (Q, L), text_feat (Q, D) normalised fp32.
    Padding to max_tokens as the official code does (spec §6.1)."""
    text_embeds, text_atts, text_feat = [], [], []
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc="texts", disable=not progress, leave=False):
        input_ids, attention_mask = tokenizer(captions[start:start + batch_size], max_length=max_tokens,
                                              padding="max_length")  # (B, L), (B, L)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with autocast_for(device, dtype):
            embeds = model.encode_text(input_ids, attention_mask)  # (B, L, Dt)
            feat = model.text_feat(embeds)  # (B, D)
        text_embeds.append(embeds.to(amp_dtype(device, dtype) or torch.float32))
        text_atts.append(attention_mask)
        text_feat.append(F.normalize(feat.float(), dim=-1))
    return torch.cat(text_embeds), torch.cat(text_atts), torch.cat(text_feat)


def _take(tree, index):
    """index_select along dim 0 through the nested tuples/lists of a cached cross-attention key/value."""
    if isinstance(tree, torch.Tensor):
        return tree[index]
    return type(tree)(_take(t, index) for t in tree)


@torch.inference_mode()
def itm_rerank(model, text_embeds, text_atts, image_embeds, topk_idx, pair_batch=1024, progress=True, dtype="auto"):
    """ITM match logits itm (Q, k) for the pairs (i, topk_idx[i, j]), spec §6.2.

    All Q·k pairs form one list processed `pair_batch` at a time, so one forward covers many queries.
    Our speed-ups, which leave each logit unchanged: queries are visited in order of text length and each
    batch is cut to its longest text (padded keys are masked, so [CLS] does not see them), all these lengths
    read back to the host at once (one sync, not one per batch); every image's cross-attention keys/values are
    computed once (`cross_kv`), not once per pair.
    """
    device = text_embeds.device
    num_queries, k = topk_idx.shape
    num_pairs = num_queries * k
    lengths = text_atts.sum(1)  # (Q,)
    order = lengths.argsort(stable=True)  # (Q,)
    query_idx = order.repeat_interleave(k)  # (Q·k,)
    image_idx = topk_idx[order].reshape(-1)  # (Q·k,)
    slots = (order[:, None] * k + torch.arange(k, device=device)).reshape(-1)  # (Q·k,) place in itm
    starts = range(0, num_pairs, pair_batch)
    last_pair = (torch.arange(len(starts), device=device) + 1).mul(pair_batch).clamp(max=num_pairs) - 1  # (n,)
    batch_lengths = lengths[query_idx[last_pair]].tolist()  # longest text of each batch: its last (one sync)
    with autocast_for(device, dtype):
        image_kv = model.cross_kv(image_embeds)
    itm = torch.empty(num_pairs, device=device)  # (Q·k,)
    for start, length in tqdm(zip(starts, batch_lengths), total=len(starts), desc="itm", disable=not progress,
                              leave=False):
        pairs = slice(start, start + pair_batch)
        q, g = query_idx[pairs], image_idx[pairs]  # (P,), (P,)
        with autocast_for(device, dtype):
            logits = model.itm_logits(text_embeds[q, :length], text_atts[q, :length],
                                      image_kv=_take(image_kv, g))  # (P, 2)
        itm[slots[pairs]] = logits[:, 1].float()  # raw match logit, spec §6.2
    return itm.view(num_queries, k)


@torch.inference_mode()
def rank_gallery(model, text_embeds, text_atts, text_feat, image_embeds, image_feat, k_rerank=128,
                 fusion="aptm", pair_batch=1024, progress=True, dtype="auto"):
    """Fused scores F (Q, G) for Q encoded texts against G encoded images, and the ITM time in seconds."""
    sim = text_feat @ image_feat.t()  # (Q, G) cosine, no temperature (spec §6.1)
    if fusion == "itc":
        return fuse_scores(sim, None, None, "itc"), 0.0
    start = time.perf_counter()
    topk_idx = sim.topk(min(k_rerank, sim.shape[1]), dim=1).indices  # (Q, k)
    itm = itm_rerank(model, text_embeds, text_atts, image_embeds, topk_idx, pair_batch, progress, dtype)  # (Q, k)
    if sim.device.type == "cuda":
        torch.cuda.synchronize(sim.device)
    return fuse_scores(sim, topk_idx, itm, fusion), time.perf_counter() - start


def evaluate_retrieval(model, tokenizer, testset, device, image_size=None, normalization=None, k_rerank=128,
                       fusion="aptm", max_tokens=None, batch_size=64, text_batch_size=256, pair_batch=1024,
                       num_workers=None, progress=True, dtype="auto"):
    """Text→image retrieval on a data.TestSet: dict(R1, R5, R10, mAP, mINP, time_features, time_itm,
    time_total) with metrics in percent and times in seconds. Called by pretrain.py / finetune.py.

    image_size and max_tokens default to model.config's; normalization is a (mean, std) pair of
    data.NORMALIZATION; batch_size is for images, text_batch_size for texts, pair_batch for ITM pairs; dtype is
    the autocast dtype (amp_dtype)."""
    if fusion not in FUSION_MODES:
        raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSION_MODES}")
    if normalization is None:
        raise ValueError("evaluate_retrieval needs the dataset's normalization (data.NORMALIZATION[...])")
    image_size = image_size or model.config.image_size
    max_tokens = max_tokens or model.config.max_tokens
    device = torch.device(device)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    image_embeds, image_feat = encode_images(model, testset.image_paths, device, image_size, normalization,
                                             batch_size, num_workers, progress, dtype)
    text_embeds, text_atts, text_feat = encode_texts(model, tokenizer, testset.captions, device, max_tokens,
                                                     text_batch_size, progress, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    time_features = time.perf_counter() - start
    scores, time_itm = rank_gallery(model, text_embeds, text_atts, text_feat, image_embeds, image_feat,
                                    k_rerank, fusion, pair_batch, progress, dtype)  # (Q, G)
    metrics = retrieval_metrics(scores, testset.q_pids, testset.g_pids)
    model.train(was_training)
    return {**metrics, "time_features": time_features, "time_itm": time_itm,
            "time_total": time.perf_counter() - start}


# -----------------------------------------------------------------------------
# The attribute oracle: a no-learning reference (ours, issue 14)

ORACLE_TIE_ORDERS = 50  # random orders of tied scores averaged over (our choice: R1 within 0.05 of the exact c/t)


def attribute_oracle_scores(testset, label_fn=synthetic.label_caption):
    """How far the captions' words alone identify a person: no images, no learning (ours).

    Each caption's 27 MALS labels come from `label_fn` (the caption → label rules of spec §3.1, −1 where
    silent); a gallery identity knows the union of its test captions' labels, as the set of (attribute, value)
    pairs they state. A query scores each gallery image by the stated labels its identity agrees with minus
    those it contradicts. -> (Q, G) float scores, integers: many ties.
    """
    labels = torch.tensor([label_fn(caption) for caption in testset.captions])  # (Q, K) in {1, 0, -1}
    identities = sorted(set(testset.g_pids))
    column = {pid: i for i, pid in enumerate(identities)}
    said_1 = (labels == 1).float()  # (Q, K)
    said_0 = (labels == 0).float()  # (Q, K)
    owner = torch.zeros(len(identities), len(testset.captions))  # (I, Q) 1 where caption q describes identity i
    owner[[column[pid] for pid in testset.q_pids], torch.arange(len(testset.captions))] = 1
    known_1 = (owner @ said_1 > 0).float()  # (I, K) some caption of the identity states value 1
    known_0 = (owner @ said_0 > 0).float()  # (I, K)
    agree = said_1 @ known_1.T + said_0 @ known_0.T  # (Q, I)
    contradict = said_1 @ known_0.T + said_0 @ known_1.T  # (Q, I)
    return (agree - contradict)[:, [column[pid] for pid in testset.g_pids]]  # (Q, G)


def attribute_oracle(testset, label_fn=synthetic.label_caption, tie_orders=ORACLE_TIE_ORDERS, seed=0):
    """R1/R5/R10/mAP/mINP of the attribute oracle, ties counted at their expected value under a random order
    (the mean over `tie_orders` seeded random orders; R1 alone could be exact: c/t of the tied top)."""
    scores = attribute_oracle_scores(testset, label_fn)  # (Q, G) integers
    generator = torch.Generator().manual_seed(seed)
    runs = [retrieval_metrics(scores + 0.5 * torch.rand(scores.shape, generator=generator), testset.q_pids,
                              testset.g_pids) for _ in range(tie_orders)]
    return {key: sum(run[key] for run in runs) / tie_orders for key in ("R1", "R5", "R10", "mAP", "mINP")}


# -----------------------------------------------------------------------------
# Search: one query against a gallery, drawn as a PNG grid

def draw_results(image_paths, scores, correct, query, out_path, tile=(192, 96)):
    """One row of the ranked images with rank and score under each, the query wrapped above; frames are
    green/red when `correct` (a list of bools) is known, grey otherwise."""
    tile_h, tile_w = tile
    pad, line_h = 6, 14
    width = pad + len(image_paths) * (tile_w + pad)
    title = textwrap.wrap(query, max(20, width // 6))  # PIL's default font is ~6 px per character
    top = pad + line_h * len(title) + pad
    canvas = Image.new("RGB", (width, top + tile_h + line_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title):
        draw.text((pad, pad + i * line_h), line, fill="black")
    for rank, (path, score) in enumerate(zip(image_paths, scores)):
        x = pad + rank * (tile_w + pad)
        with Image.open(path) as image:
            canvas.paste(image.convert("RGB").resize((tile_w, tile_h), Image.BICUBIC), (x, top))
        colour = "grey" if correct is None else ("green" if correct[rank] else "red")
        draw.rectangle([x - 2, top - 2, x + tile_w + 1, top + tile_h + 1], outline=colour, width=3)
        draw.text((x, top + tile_h + 4), f"#{rank + 1}  {score:.3f}", fill="black")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    canvas.save(out_path)


def list_images(folder):
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        data.fail(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return paths


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    parser.add_argument("--ckpt", help="checkpoint of ours or an official APTM .pth")
    parser.add_argument("--oracle", action="store_true", help="no model: score the attribute oracle, a "
                        "no-learning reference from the captions' words alone (attribute_oracle)")
    parser.add_argument("--bert", default=None, help="bert-base-uncased folder: the tokenizer for official "
                        "checkpoints, which carry none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # data
    parser.add_argument("--dataset", default="synthetic", choices=("synthetic", "cuhk", "icfg", "rstp"))
    parser.add_argument("--data-root", default=None, help="dataset folder (default data/<dataset>; "
                        "data/synthetic is generated if missing)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    # ranking (spec §6.2)
    parser.add_argument("--fusion", default="aptm", choices=FUSION_MODES, help="aptm: released code, one "
                        "GPU; aptm4: released code on 4 GPUs; itm: first release (probably the paper's numbers, "
                        "spec §10.3); itc: no re-rank")
    parser.add_argument("--k-rerank", type=int, default=128, help="images re-ranked by ITM per query "
                        "(k_test: 128 in configs/*.yaml)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    parser.add_argument("--text-batch-size", type=int, default=256, help="texts per encoder batch "
                        "(batch_size_test_text in configs/*.yaml)")
    parser.add_argument("--pair-batch", type=int, default=1024, help="(query, image) pairs per ITM forward")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="autocast dtype; auto: bfloat16 on a GPU, "
                        "float32 on a CPU; float32 for parity with the paper's numbers (the official evaluation)")
    parser.add_argument("--workers", "--num-workers", dest="num_workers", type=int, default=None,
                        help="image-loading processes (default: 6 on a GPU, 0 on a CPU); --num-workers is the "
                        "older spelling")
    parser.add_argument("--json", default=None, help="write the metrics here")
    # search
    parser.add_argument("--query", default=None, help="free text: search the gallery instead of evaluating")
    parser.add_argument("--query-index", type=int, default=None, help="search with the dataset's caption i "
                        "(its pid is known, so results are marked right/wrong)")
    parser.add_argument("--pid", default=None, help="pid of a free-text --query, to mark results right/wrong")
    parser.add_argument("--images", default=None, help="search this folder of images instead of a dataset "
                        "(normalised as --dataset)")
    parser.add_argument("--top", type=int, default=10, help="results shown")
    parser.add_argument("--out", default="out/search.png", help="PNG grid of the search results")
    args = parser.parse_args(argv)

    if args.oracle and (args.ckpt or args.query is not None or args.query_index is not None):
        data.fail("--oracle needs no --ckpt and does not search: it scores the captions alone")
    if not args.oracle and args.ckpt is None:
        data.fail("give --ckpt (a checkpoint to evaluate), or --oracle")
    if args.ckpt is not None and not os.path.isfile(args.ckpt):
        data.fail(f"checkpoint {args.ckpt} not found")
    if args.k_rerank < 1 or args.top < 1:
        data.fail("--k-rerank and --top must be ≥ 1")
    if min(args.batch_size, args.text_batch_size, args.pair_batch) < 1 or (args.num_workers or 0) < 0:
        data.fail("batch sizes must be ≥ 1 and --workers ≥ 0")
    if args.query is not None and args.query_index is not None:
        data.fail("give --query or --query-index, not both")
    search = args.query is not None or args.query_index is not None
    if not search and (args.images or args.pid is not None):
        data.fail("--images and --pid need --query (search mode)")
    if args.pid is not None and args.query_index is not None:
        data.fail("--pid is for a free-text --query; --query-index already knows its pid")
    if args.images is not None and (args.query_index is not None or args.pid is not None):
        data.fail("--images galleries have no pids: --query-index and --pid need a --dataset gallery")
    if args.images is not None and not os.path.isdir(args.images):
        data.fail(f"--images {args.images} is not a folder")
    if args.query is not None and not args.query.strip():
        data.fail("--query is empty")
    if args.bert is not None and not os.path.isdir(args.bert):
        data.fail(f"--bert {args.bert} is not a folder")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        data.fail(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


def run_search(args, model, tokenizer, device, normalization):
    """Rank a gallery for one query with the evaluation's two-stage scoring; print and draw the top."""
    if args.images is not None:
        image_paths, g_pids, query, query_pid = list_images(args.images), None, args.query, None
    else:
        testset = data.load_retrieval(args.dataset, args.data_root, args.split)
        image_paths, g_pids = testset.image_paths, testset.g_pids
        if args.query_index is not None:
            if not 0 <= args.query_index < len(testset.captions):
                data.fail(f"--query-index {args.query_index} outside 0..{len(testset.captions) - 1}")
            query, query_pid = testset.captions[args.query_index], testset.q_pids[args.query_index]
        else:
            query, query_pid = args.query, args.pid
    if args.query is not None:  # as the dataset's test captions (spec §4.7)
        try:
            query = data.pre_caption(args.query, clean=data.CLEAN_TEST_CAPTIONS[args.dataset])
        except ValueError:
            data.fail(f"--query {args.query!r} is empty after cleaning")
    image_embeds, image_feat = encode_images(model, image_paths, device, model.config.image_size,
                                             normalization, args.batch_size, args.num_workers, dtype=args.dtype)
    text_embeds, text_atts, text_feat = encode_texts(model, tokenizer, [query], device, model.config.max_tokens,
                                                     dtype=args.dtype)
    scores, _ = rank_gallery(model, text_embeds, text_atts, text_feat, image_embeds, image_feat, args.k_rerank,
                             args.fusion, args.pair_batch, dtype=args.dtype)  # (1, G)
    top_scores, top_idx = scores[0].topk(min(args.top, len(image_paths)))
    top_paths = [image_paths[j] for j in top_idx.tolist()]
    correct = None if query_pid is None else [str(g_pids[j]) == str(query_pid) for j in top_idx.tolist()]
    print(f"query: {query}" + ("" if query_pid is None else f"  (pid {query_pid})"))
    for rank, (path, score) in enumerate(zip(top_paths, top_scores.tolist())):
        mark = "" if correct is None else ("  right" if correct[rank] else "  wrong")
        print(f"{rank + 1:3d}  {score:.4f}  {path}{mark}")
    draw_results(top_paths, top_scores.tolist(), correct, query, args.out)
    print(f"wrote {args.out}")


def main(argv=None):
    args = parse_args(argv)
    if args.dataset == "synthetic" and args.images is None:
        synthetic.synthetic_world(args.data_root or "data/synthetic")  # generated with the defaults if missing
    if args.oracle:
        testset = data.load_retrieval(args.dataset, args.data_root, args.split)
        start = time.perf_counter()
        result = attribute_oracle(testset)
        result.update(fusion="oracle", time_total=time.perf_counter() - start)
    else:
        device = torch.device(args.device)
        model, tokenizer = data.load_model_and_tokenizer(args.ckpt, args.bert, device)
        normalization = data.NORMALIZATION[args.dataset]
        if args.query is not None or args.query_index is not None:
            run_search(args, model, tokenizer, device, normalization)
            return None
        testset = data.load_retrieval(args.dataset, args.data_root, args.split)
        result = evaluate_retrieval(model, tokenizer, testset, device, model.config.image_size, normalization,
                                    args.k_rerank, args.fusion, model.config.max_tokens, args.batch_size,
                                    args.text_batch_size, args.pair_batch, args.num_workers, dtype=args.dtype)
        result.update(fusion=args.fusion, dtype=args.dtype)
    result = {"dataset": args.dataset, "split": args.split, "k_rerank": args.k_rerank,
              "queries": len(testset.captions), "gallery": len(testset.image_paths), **result}
    header = ("dataset", "split", "fusion", "queries", "gallery", "R1", "R5", "R10", "mAP", "mINP", "seconds")
    row = (args.dataset, args.split, result["fusion"], result["queries"], result["gallery"],
           *(f"{result[key]:.2f}" for key in ("R1", "R5", "R10", "mAP", "mINP")), f"{result['time_total']:.1f}")
    widths = [max(len(str(h)), len(str(v))) for h, v in zip(header, row)]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
