"""Attribute prompts of APTM: the prompt tables, label → prompt targets, the three attribute losses
(IAC, IAM, MAM) wired to the model, attribute prediction by ITM, and the PA-100K metrics (with one
of ours beside them: the AUC of the prompt-pair scores, which needs no threshold).

Spec §3.1 (MALS, 27 attributes), §3.2 (PA-100K, 26 attributes), §3.3 (prediction), §3.4 (metrics),
§2.5–2.7 (the losses, computed in losses.py).

    python attributes.py --ckpt out/pretrain/ckpt.pt                 # the synthetic world's attribute test split
    python attributes.py --ckpt ft_pa100k/checkpoint_best.pth --bert data/bert-base-uncased \
        --dataset pa100k --data-root data/PA100K                      # PA-100K test split
    python attributes.py --ckpt out/pretrain/ckpt.pt --image person.jpg   # one image's predicted attributes

Fine-tuning with E13 (PA-100K, or the synthetic attribute split) is finetune.py's: `python finetune.py --dataset
pa100k ...` or `--dataset synthetic-attr`. This file uses no training script.

Label semantics (spec §3.1). Attribute k has two prompts: prompt 2k is the "label 0" sentence and
prompt 2k + 1 the "label 1" sentence, so for a label a ∈ {0, 1} **prompt 2k + a is the true one**
and prompt 2k + 1 − a is false. −1 means unknown (the caption did not say): the image is left out of
IAC for that attribute, its pairs with both prompts are left out of IAM, and it is never the
conditioning image of either prompt in MAM. The polarity is fixed by the tables alone:
- MALS flips it: for attributes 0–2 and 7–9 label 0 is a category (woman, younger than 18, short
  hair, long sleeves, long lower clothes, dress or skirt); for attributes 3–6 and 10–26 label 0
  means the item is present ("with a hat", "wears black upper clothes") and 1 that it is absent.
- PA-100K: label 1 always means the attribute is present (the dataset's own annotation).

Letters (shapes): B images, N image tokens, Dv vision width, L prompt tokens, Dt text width,
D projection dim, K attributes, P = 2K prompts, S prompts drawn for IAM (5), M masked positions,
V vocabulary, R prompts kept by MAM.

This file is the only place the prompt tables exist.
"""
import argparse
import json

import torch
from tqdm import tqdm

import losses
from data import (NORMALIZATION, PROMPT_MASK_KEYS, ImageDataset, Loader, default_workers, fail, join_prompt_rows,
                  load_image, load_model_and_tokenizer, read_attributes, test_transform)
from model import autocast_for, take_kv
from synthetic import synthetic_world

# ---------------------------------------------------------------------------------------------------
# Prompt tables (verbatim from the official code, spec §3.1 [trains.py: train_attr] and
# §3.2 [train_pa100ks.py; reTools.py: evaluation_attr]); prompts 2k, 2k + 1 belong to attribute k.
# ---------------------------------------------------------------------------------------------------

MALS_ATTRIBUTES = (
    "gender", "age", "hair_length", "hat", "backpack", "handbag", "bag",
    "sleeve_length", "lower_length", "lower_type",
    "upper_black", "upper_white", "upper_red", "upper_purple",
    "upper_yellow", "upper_blue", "upper_green", "upper_gray",
    "lower_black", "lower_white", "lower_purple", "lower_yellow",
    "lower_blue", "lower_green", "lower_pink", "lower_gray", "lower_brown",
)

MALS_PROMPTS = (
    "the person is a woman", "the person is a man",  # 0 gender
    "the person is younger than 18 years old", "the person is older than 18 years old",  # 1 age
    "the person with short hair", "the person with long hair",  # 2 hair length
    "the person with a hat", "the person without a hat",  # 3 hat
    "the person with a backpack", "the person without a backpack",  # 4 backpack
    "the person with a handbag", "the person without a handbag",  # 5 handbag
    "the person with a bag", "the person without a bag",  # 6 bag
    "the person wears long sleeved upper clothes", "the person wears short sleeved upper clothes",  # 7
    "the person wears long dress or long pants", "the person wears short dress or short pants",  # 8
    "the person wears dress or skirt", "the person wears pants or shorts",  # 9 lower-body type
    "the person wears black upper clothes", "the person does not wear black upper clothes",  # 10
    "the person wears white upper clothes", "the person does not wear white upper clothes",  # 11
    "the person wears red upper clothes", "the person does not wear red upper clothes",  # 12
    "the person wears purple upper clothes", "the person does not wear purple upper clothes",  # 13
    "the person wears yellow upper clothes", "the person does not wear yellow upper clothes",  # 14
    "the person wears blue upper clothes", "the person does not wear blue upper clothes",  # 15
    "the person wears green upper clothes", "the person does not wear green upper clothes",  # 16
    "the person wears gray upper clothes", "the person does not wear gray upper clothes",  # 17
    "the person wears black lower clothes", "the person does not wear black lower clothes",  # 18
    "the person wears white lower clothes", "the person does not wear white lower clothes",  # 19
    "the person wears purple lower clothes", "the person does not wear purple lower clothes",  # 20
    "the person wears yellow lower clothes", "the person does not wear yellow lower clothes",  # 21
    "the person wears blue lower clothes", "the person does not wear blue lower clothes",  # 22
    "the person wears green lower clothes", "the person does not wear green lower clothes",  # 23
    "the person wears pink lower clothes", "the person does not wear pink lower clothes",  # 24
    "the person wears gray lower clothes", "the person does not wear gray lower clothes",  # 25
    "the person wears brown lower clothes", "the person does not wear brown lower clothes",  # 26
)

PA100K_ATTRIBUTES = (
    "Female", "AgeOver60", "Age18-60", "AgeLess18", "Front", "Side", "Back",
    "Hat", "Glasses", "HandBag", "ShoulderBag", "Backpack", "HoldObjectsInFront",
    "ShortSleeve", "LongSleeve", "UpperStride", "UpperLogo", "UpperPlaid", "UpperSplice",
    "LowerStripe", "LowerPattern", "LongCoat", "Trousers", "Shorts", "Skirt&Dress", "boots",
)

PA100K_PROMPTS = (
    "the person is a man", "the person is a woman",  # 0 Female
    "the person is no more than 60 years old", "the person is older than 60 years old",  # 1 AgeOver60
    "the person is a young or old one", "the person is of mid age, between 18 and 60 years old",  # 2
    "the person is older than 18", "the person is a baby or a teenager, younger than 18",  # 3 AgeLess18
    "the picture is not the front of the person", "the picture shows the front of the person",  # 4
    "the picture is not the side of the person", "the picture shows the side of the person",  # 5 Side
    "the picture is not the back of the person", "the picture shows the back of the person",  # 6 Back
    "a person without a hat", "a person with a hat",  # 7 Hat
    "a person without a glasses", "a person with a glasses",  # 8 Glasses
    "a person without a handbag", "a person with a handbag",  # 9 HandBag
    "a person without a shoulder bag", "a person with a shoulder bag",  # 10 ShoulderBag
    "a person without a backpack", "a person with a backpack",  # 11 Backpack
    "the person does not hold an object in front", "the person hold an object in front",  # 12
    "the person does not wear short sleeved upper clothes", "the person wears short sleeved upper clothes",  # 13
    "the person does not wear long sleeved upper clothes", "the person wears long sleeved upper clothes",  # 14
    "there is no stride on the upper clothes of the person",
    "there is stride on the upper clothes of the person",  # 15 UpperStride
    "there is no logo on the upper clothes of the person",
    "there is logo on the upper clothes of the person",  # 16 UpperLogo
    "there is no plaid on the upper clothes of the person",
    "there is plaid on the upper clothes of the person",  # 17 UpperPlaid
    "there is no splice on the upper clothes of the person",
    "there is splice on the upper clothes of the person",  # 18 UpperSplice
    # 19 LowerStripe: "upper clothes" is the official code's wording; kept verbatim for parity with
    # the released ft_pa100k checkpoint (spec §3.2).
    "there is no stripe on the upper clothes of the person",
    "there is stripe on the upper clothes of the person",
    "there is no pattern on the lower part of the person",
    "there is pattern on the lower part of the person",  # 20 LowerPattern
    "the person does not wear long coat", "the person wears long coat",  # 21 LongCoat
    "the person does not wear trousers", "the person wears trousers",  # 22 Trousers
    "the person does not wear shorts", "the person wears shorts",  # 23 Shorts
    "the person does not wear a skirt or a dress", "the person wears a skirt or a dress",  # 24
    "the person does not wear boots", "the person wears boots",  # 25 boots
)

PROMPT_TABLES = {"mals": MALS_PROMPTS, "pa100k": PA100K_PROMPTS}
ATTRIBUTE_TABLES = {"mals": MALS_ATTRIBUTES, "pa100k": PA100K_ATTRIBUTES}

PREDICT_PAIR_BATCH = 2048  # (image, prompt) pairs per cross-encoder call in attribute_scores (our choice)


def prompt_targets(attr_labels):
    """Prompt targets from attribute labels (spec §2.6): m_b,2k = 1 − a_bk, m_b,2k+1 = a_bk, −1 kept.

    attr_labels (B, K) in {0, 1, −1} -> (B, P) in {0, 1, −1}: 1 where the prompt is true for the
    image, 0 where its opposite is true, −1 where the attribute is unknown.
    """
    m_label0 = torch.where(attr_labels == -1, -1, 1 - attr_labels)  # (B, K) prompt 2k
    m_label1 = attr_labels  # (B, K) prompt 2k + 1
    return torch.stack([m_label0, m_label1], dim=2).flatten(1)  # (B, P)


def attribute_losses(model, image_embeds, image_feat, attr_labels, prompt_ids, prompt_atts,
                     prompt_masked_ids, prompt_masked_pos, prompt_masked_labels, generator,
                     label_smoothing=0.0, image_kv=None, draws=None):
    """IAC (E4), IAM (E5) and MAM (E6) of one training step (spec §2.5–2.7).

    | argument             | shape       | meaning                                                  |
    |----------------------|-------------|----------------------------------------------------------|
    | image_embeds         | (B, N, Dv)  | model.encode_image output                                |
    | image_feat           | (B, D)      | model.image_feat(image_embeds), not normalised           |
    | attr_labels          | (B, K)      | {0, 1, −1}                                               |
    | prompt_ids/atts      | (P, L)      | all P prompts, tokenised with padding "longest"          |
    | prompt_masked_ids    | (P, L)      | the prompts masked as captions are (spec §2.4, §2.7)     |
    | prompt_masked_pos    | (P, M)      | masked positions                                         |
    | prompt_masked_labels | (P, M)      | original ids there, −100 = padding                       |
    | generator            | —           | torch.Generator on the device of the tensors             |
    | label_smoothing      | float       | ε of E7 for IAC and IAM (paper pre-training 0.4; tiny 0) |
    | image_kv             | —           | model.cross_kv(image_embeds), or None                    |
    | draws                | —           | attribute_draws(...) made beforehand, or None            |

    The prompts are encoded once with the text encoder; IAC contrasts their projections with the
    images; IAM runs the cross encoder on 5 random prompts × every image in one (5·B)-pair batch (the
    official code makes 5 calls of B pairs: same values); MAM runs the MLM on every masked prompt,
    conditioned on one of its true images chosen at random, and a prompt without a true image in the
    batch weighs zero (spec §2.7 drops it: same value, but a fixed shape and no host sync). With
    `image_kv` (our speed-up, same values) each image's cross-attention keys/values are projected once
    and indexed for its pairs. With `draws` the random choices were made earlier (so that this
    function runs inside a compiled graph) and `generator` is unused. Returns dict(iac, iam, mam).
    """
    batch_size = image_embeds.shape[0]
    prompt_embeds = model.encode_text(prompt_ids, prompt_atts)  # (P, L, Dt)
    prompt_feat = model.text_feat(prompt_embeds)  # (P, D)
    m = prompt_targets(attr_labels)  # (B, P)
    chosen, image_idx, has_true = draws if draws is not None else attribute_draws(attr_labels, generator)

    # IAC (E4): spec §2.5
    iac = losses.iac_loss(image_feat, prompt_feat, attr_labels, model.temp, label_smoothing)

    # IAM (E5): spec §2.6, pairs ordered prompt-major, row s·B + b = (prompt chosen[s], image b)
    num_chosen = chosen.shape[0]
    pair_text_embeds = prompt_embeds[chosen].repeat_interleave(batch_size, dim=0)  # (S·B, L, Dt)
    pair_text_atts = prompt_atts[chosen].repeat_interleave(batch_size, dim=0)  # (S·B, L)
    if image_kv is None:
        iam_logits = model.itm_logits(pair_text_embeds, pair_text_atts, image_embeds.repeat(num_chosen, 1, 1))
    else:
        pair_image = torch.arange(batch_size, device=image_embeds.device).repeat(num_chosen)  # (S·B,)
        iam_logits = model.itm_logits(pair_text_embeds, pair_text_atts, image_kv=take_kv(image_kv, pair_image))
    iam_targets = m[:, chosen].T.flatten()  # (S·B,)
    iam = losses.iam_loss(iam_logits, iam_targets, label_smoothing, num_prompts=num_chosen)  # logits (S·B, 2)

    # MAM (E6): spec §2.7, one true image per prompt; prompts without one weigh zero
    if image_kv is None:
        mam_logits = model.mlm_logits(prompt_masked_ids, prompt_atts, image_embeds[image_idx], prompt_masked_pos)
    else:
        mam_logits = model.mlm_logits(prompt_masked_ids, prompt_atts, None, prompt_masked_pos,
                                      image_kv=take_kv(image_kv, image_idx))  # (P, M, V)
    mam = losses.mam_loss(mam_logits, losses.mam_targets(prompt_masked_labels, has_true))
    return {"iac": iac, "iam": iam, "mam": mam}


def attribute_draws(attr_labels, generator):
    """The random choices of one step's attribute stream: the S IAM prompts (spec §2.6) and each prompt's
    MAM image (spec §2.7) -> (chosen (S,), image_idx (P,), has_true (P,)), on the generator's device."""
    chosen = losses.sample_iam_prompts(2 * attr_labels.shape[1], generator)  # (S,)
    image_idx, has_true = losses.sample_mam_images(prompt_targets(attr_labels), generator)  # (P,), (P,)
    return chosen.to(attr_labels.device), image_idx, has_true


@torch.no_grad()
def attribute_scores(model, image_embeds, prompt_embeds, prompt_atts, pair_batch_size=PREDICT_PAIR_BATCH):
    """ITM match logits of every image with every prompt (spec §3.3), grouped by attribute.

        s_bt = itm_head(X(prompt_t, I_b)[0])[1]      (raw match logit, no softmax)

    | symbol | argument      | shape         |
    |--------|---------------|---------------|
    | I_b    | image_embeds  | (B, N, Dv)    |
    | —      | prompt_embeds | (P, L, Dt)    |
    | —      | prompt_atts   | (P, L)        |
    | s      | returned      | (B, K, 2) fp32; s[b, k, a] is the score of prompt 2k + a |

    All B·P pairs go through the cross encoder in chunks of about `pair_batch_size` pairs (whole
    images per chunk). The caller puts the model in eval mode. ITC/IAC similarities are not used.
    """
    num_images = image_embeds.shape[0]
    num_prompts = prompt_embeds.shape[0]
    images_per_chunk = max(1, pair_batch_size // num_prompts)
    scores = []
    for start in range(0, num_images, images_per_chunk):
        chunk = image_embeds[start:start + images_per_chunk]  # (b, N, Dv)
        pair_image_embeds = chunk.repeat_interleave(num_prompts, dim=0)  # (b·P, N, Dv) image-major
        pair_text_embeds = prompt_embeds.repeat(chunk.shape[0], 1, 1)  # (b·P, L, Dt)
        pair_text_atts = prompt_atts.repeat(chunk.shape[0], 1)  # (b·P, L)
        logits = model.itm_logits(pair_text_embeds, pair_text_atts, pair_image_embeds)  # (b·P, 2)
        scores.append(logits[:, 1].float().view(chunk.shape[0], num_prompts))  # (b, P)
    return torch.cat(scores).unflatten(1, (num_prompts // 2, 2))  # (B, K, 2)


def predict_attributes(scores):
    """Predicted attributes (spec §3.3): â_bk = 1 iff s_b,2k+1 > s_b,2k, ties → 0 (as numpy argmax).

    scores (B, K, 2) from `attribute_scores` -> (B, K) long in {0, 1}.
    """
    return (scores[..., 1] > scores[..., 0]).long()


def pair_auc(margin, gt):
    """Per-attribute ROC AUC of the prompt-pair margin, in percent (ours; not in the paper or spec §3.4).

        AUC_k = P(d_nk > d_mk) + ½ P(d_nk = d_mk)   over images n with G_nk = 1 and m with G_mk = 0,
        d_bk = s_b,2k+1 − s_b,2k                      (the margin that §3.3 thresholds at 0)

    | symbol | argument | shape  |
    |--------|----------|--------|
    | d      | margin   | (N, K) |
    | G      | gt       | (N, K) in {0, 1} |

    Threshold-free: 50 when the margin does not depend on the image, 100 when it orders every
    label-1 image above every label-0 image. It shows what the prompts have learned even when a
    weak model's margins never cross 0, so that mA sits at 50. An attribute without a label-1 or
    a label-0 image gets NaN. Returns a (K,) float64 tensor.
    """
    if ((gt != 0) & (gt != 1)).any():
        raise ValueError("pair_auc needs labels in {0, 1}")
    auc = torch.full((gt.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(gt.shape[1]):
        pos, neg = margin[gt[:, k] == 1, k], margin[gt[:, k] == 0, k]
        if len(pos) and len(neg):
            above, tied = (pos[:, None] > neg[None]).sum(), (pos[:, None] == neg[None]).sum()  # over (n1, n0) pairs
            auc[k] = 100 * (above + 0.5 * tied).double() / (len(pos) * len(neg))
    return auc


def attribute_metrics(pred, gt):
    """Pedestrian-attribute metrics in percent, as the official code computes them (spec §3.4).

        mA   = (1/K) Σ_k ½ [ Σ_n P_nk G_nk / Σ_n G_nk + Σ_n (1−P_nk)(1−G_nk) / Σ_n (1−G_nk) ]
        Acc  = (1/N) Σ_n |P_n ∧ G_n| / |P_n ∨ G_n|
        Prec = (1/N) Σ_n |P_n ∧ G_n| / |P_n|
        Rec  = (1/N) Σ_n |P_n ∧ G_n| / |G_n|
        F1   = 2 · Prec · Rec / (Prec + Rec)        (from the averaged Prec and Rec)

    | symbol | argument | shape  |
    |--------|----------|--------|
    | P      | pred     | (N, K) in {0, 1} |
    | G      | gt       | (N, K) in {0, 1} |

    Guard (our choice; the official code has none and turns any 0/0 into NaN for the whole metric):
    every ratio above is 0/0 when its denominator is 0 (an attribute with no positive or no
    negative image, an instance with no predicted or no true positive, or with neither). Such a
    ratio is left out of its mean (a NaN-skipping mean: an attribute with no positive image scores
    its negative-class accuracy), a mean with no defined ratio is 0, and F1 is 0 when
    Prec + Rec = 0. Without any zero denominator the values are exactly the official ones (not
    rounded; the official code prints fractions rounded to 4 decimals). Returns Python floats.
    """
    if pred.shape != gt.shape or pred.dim() != 2 or pred.shape[0] == 0:
        raise ValueError(f"pred and gt must both be (N, K) with N > 0, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    for name, tensor in (("pred", pred), ("gt", gt)):
        if not ((tensor == 0) | (tensor == 1)).all():
            raise ValueError(f"{name} must hold only 0 and 1 (unknown labels −1 cannot be scored)")
    P = pred.double()  # (N, K)
    G = gt.double()  # (N, K)

    def mean_of_defined(ratio, dim=None):
        mean = ratio.nanmean() if dim is None else ratio.nanmean(dim=dim)
        return torch.nan_to_num(mean, nan=0.0)

    # label-based mA
    positive_acc = (P * G).sum(0) / G.sum(0)  # (K,)
    negative_acc = ((1 - P) * (1 - G)).sum(0) / (1 - G).sum(0)  # (K,)
    label_ma = mean_of_defined(torch.stack([positive_acc, negative_acc]), dim=0)  # (K,)
    ma = label_ma.mean()
    # instance-based Acc, Prec, Rec, F1
    intersection = (P * G).sum(1)  # (N,)
    union = torch.maximum(P, G).sum(1)  # (N,)
    acc = mean_of_defined(intersection / union)
    prec = mean_of_defined(intersection / P.sum(1))
    rec = mean_of_defined(intersection / G.sum(1))
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else torch.zeros((), dtype=torch.float64)
    return {name: 100 * float(value) for name, value in
            (("mA", ma), ("Acc", acc), ("Prec", prec), ("Rec", rec), ("F1", f1))}


# ---------------------------------------------------------------------------------------------------
# Attribute recognition on a dataset (`python attributes.py`; finetune.py trains with E13)
# ---------------------------------------------------------------------------------------------------

ATTRIBUTE_DATASETS = {"synthetic": ("mals", "cuhk"), "pa100k": ("pa100k", "pa100k")}  # → (prompt table, norm)
PROMPT_MAX_TOKENS = {"mals": 56, "pa100k": 15}  # max_tokens of the prompt batch (spec §3.2, configs/*.yaml)


def encode_prompts(model, tokenizer, prompts, max_tokens):
    """All prompts through the text encoder, padded to the longest (spec §3.1) → (P, L, Dt), (P, L)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_atts = tokenizer(list(prompts), max_length=max_tokens, padding="longest")  # (P, L)
    prompt_ids, prompt_atts = prompt_ids.to(device), prompt_atts.to(device)
    return model.encode_text(prompt_ids, prompt_atts), prompt_atts


@torch.no_grad()
def evaluate_attributes(model, tokenizer, entries, table, normalization, batch_size=128, workers=None):
    """Predict every image's attributes (spec §3.3) and score them (spec §3.4, plus the pair-score AUC)
    → (metrics, per-attribute {"mA", "AUC"})."""
    device = next(model.parameters()).device
    model.eval()
    prompts = PROMPT_TABLES[table]
    dataset = ImageDataset([path for path, _ in entries], test_transform(model.config.image_size, normalization))
    workers = default_workers(device) if workers is None else workers
    loader = Loader(dataset, batch_size=batch_size, num_workers=workers)
    scores = []
    with autocast_for(device):
        prompt_embeds, prompt_atts = encode_prompts(model, tokenizer, prompts, PROMPT_MAX_TOKENS[table])
        for batch in tqdm(loader, desc="attributes", leave=False, dynamic_ncols=True):
            image_embeds = model.encode_image(batch["image"].to(device))  # (B, N, Dv)
            scores.append(attribute_scores(model, image_embeds, prompt_embeds, prompt_atts).cpu())
    s = torch.cat(scores)  # (N, K, 2)
    pred = predict_attributes(s)  # (N, K)
    gt = torch.tensor([label for _, label in entries])  # (N, K)
    if gt.shape[1] != len(prompts) // 2:
        raise ValueError(f"labels have {gt.shape[1]} attributes but the {table} prompts describe {len(prompts) // 2}")
    auc = pair_auc(s[..., 1] - s[..., 0], gt)  # (K,)
    per_attribute = [{"mA": attribute_metrics(pred[:, k:k + 1], gt[:, k:k + 1])["mA"], "AUC": float(auc[k])}
                     for k in range(gt.shape[1])]
    return {**attribute_metrics(pred, gt), "AUC": float(auc.nanmean())}, per_attribute


class PromptStream(torch.nn.Module):
    """The attribute-prompt stream (E4–E6): a table's prompts, tokenised once and padded to the longest (spec §3.1).
    Their masking for MAM (spec §2.7) comes with each batch, drawn in the data-loader workers (data.PromptMasking
    with the same tokenizer, prompts and max_tokens)."""

    def __init__(self, tokenizer, prompts, max_tokens, label_smoothing):
        super().__init__()
        self.label_smoothing = label_smoothing
        prompt_ids, prompt_atts = tokenizer(list(prompts), max_length=max_tokens, padding="longest")  # (P, Lp)
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("prompt_atts", prompt_atts, persistent=False)

    def forward(self, model, image_embeds, image_feat, batch, draws, image_kv=None):
        """-> dict(iac, iam, mam) for a batch of images (B, N, Dv), their ITC features (B, D), the batch (its
        attr_label (B, K) and prompt masking) and the step's attribute_draws."""
        num_prompts = self.prompt_ids.shape[0]
        masked = [join_prompt_rows(batch[key], num_prompts) for key in PROMPT_MASK_KEYS]  # (P, Lp), (P, M), (P, M)
        if masked[0].shape != self.prompt_ids.shape:
            raise ValueError(f"the batch's prompt masking has shape {tuple(masked[0].shape)}, the prompts "
                             f"{tuple(self.prompt_ids.shape)}: build data.PromptMasking with the same tokenizer, "
                             "prompts and max_tokens")
        return attribute_losses(model, image_embeds, image_feat, batch["attr_label"], self.prompt_ids,
                                self.prompt_atts, *masked, None, self.label_smoothing, image_kv, draws)


def print_table(metrics, per_attribute, names):
    print("  ".join(f"{key} {value:.2f}" for key, value in metrics.items()))
    print(f"{'attribute':<16} {'mA':>6} {'AUC':>6}")
    for name, values in zip(names, per_attribute):
        print(f"{name:<16} {values['mA']:6.2f} {values['AUC']:6.2f}")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Attribute recognition with APTM's prompts (spec §3).")
    parser.add_argument("--ckpt", required=True, help="checkpoint of ours, or an official APTM .pth (with --bert)")
    parser.add_argument("--bert", help="bert-base-uncased folder: the vocabulary of an official checkpoint")
    parser.add_argument("--dataset", default="synthetic", choices=sorted(ATTRIBUTE_DATASETS),
                        help="synthetic: the synthetic world's attribute split, 27 MALS attributes with full labels")
    parser.add_argument("--data-root", help="PA-100K folder (PA100K_{train,val,test}.json or annotation.mat); "
                        "for synthetic, the world's folder (default data/synthetic)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="synthetic: train or test")
    parser.add_argument("--image", help="print the predicted attributes of this one image")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch")
    parser.add_argument("--workers", type=int, help="data-loader processes; default 6 on a GPU, 0 on a CPU "
                        "(data.default_workers)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the metrics here")
    args = parser.parse_args(argv)
    if args.dataset == "pa100k" and not args.data_root and not args.image:
        parser.error("--dataset pa100k needs --data-root")
    if args.batch_size < 1 or (args.workers or 0) < 0:
        parser.error("--batch-size must be at least 1 and --workers at least 0")
    return args


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.ckpt, args.bert, device)
    table, norm = ATTRIBUTE_DATASETS[args.dataset]
    normalization = NORMALIZATION[norm]
    names = ATTRIBUTE_TABLES[table]
    if args.image:
        image = test_transform(model.config.image_size, normalization)(load_image(args.image))[None].to(device)
        model.eval()
        with torch.no_grad(), autocast_for(device):
            prompt_embeds, prompt_atts = encode_prompts(model, tokenizer, PROMPT_TABLES[table],
                                                        PROMPT_MAX_TOKENS[table])
            pred = predict_attributes(attribute_scores(model, model.encode_image(image), prompt_embeds, prompt_atts))[0]
        prompts = PROMPT_TABLES[table]
        for k, name in enumerate(names):
            print(f"{name:<16} {prompts[2 * k + int(pred[k])]}")
        return pred
    entries = attribute_split(args.dataset, args.data_root, args.split)
    if not entries:
        fail(f"the {args.dataset} {args.split} split is empty")
    metrics, per_attribute = evaluate_attributes(model, tokenizer, entries, table, normalization, args.batch_size,
                                                 args.workers)
    print_table(metrics, per_attribute, names)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(metrics=metrics, per_attribute=dict(zip(names, per_attribute))), f, indent=1)
    return metrics


def attribute_split(dataset, data_root, split):
    """(image_path, labels) of a split: the synthetic world's attr_{split}.json (data_root: the world's folder,
    default data/synthetic, made if missing; train and test only), or PA-100K's under data_root."""
    if dataset == "synthetic":
        world = synthetic_world(data_root or "data/synthetic")
        if f"attr_{split}" not in world:
            fail(f"the synthetic attribute data has train and test splits, not {split!r}")
        return read_attributes(world[f"attr_{split}"])
    entries = read_attributes(data_root, split=split)
    expected = len(ATTRIBUTE_TABLES[ATTRIBUTE_DATASETS[dataset][0]])
    if len(entries[0][1]) != expected:  # read_attributes takes 26 (PA-100K) or 27 (MALS) labels
        fail(f"{data_root}: the {split} labels hold {len(entries[0][1])} attributes; {dataset} has {expected}")
    return entries


if __name__ == "__main__":
    main()
