"""The APTM losses: one pure function per equation of spec §2 (E1–E13), plus the random samplers.

Every loss takes tensors and returns a scalar tensor: no model calls, no `.item()`, no
`torch.distributed`, no Python loop over samples. Feature gathering across GPUs happens outside
(the caller passes gathered features to `itc_loss`). Logits and softmaxes are computed in fp32 with
autocast switched off, even when the caller runs under bf16/fp16 autocast: fp16/bf16 inputs are cast
to fp32, fp64 stays fp64 (STYLE.md).

Randomness (ITM hard negatives, the 5 IAM prompts, the MAM conditioning images) lives in separate
`sample_*` functions that take a `torch.Generator` on the device of their tensors, so a seeded
generator reproduces a training step exactly. None of them reads a value back to the host (no
multinomial, no nonzero): a training step never waits for the device.

Letters (shapes): B batch, D projection dim, K attributes, P = 2K prompts, S prompts drawn for IAM
(5), M masked positions per row, V vocabulary, C classes of a cross-entropy, R rows of the MAM batch (all P in training).

Equation numbers E1…E13 are those of the spec (the paper's own numbers are not known, spec §10).
"""
import functools

import torch
import torch.nn.functional as F

HARD_NEGATIVE_EPS = 1e-5  # added to the hard-negative weights before masking [models/aptm.py: get_matching_loss]
IAM_NUM_PROMPTS = 5  # prompts drawn per step for IAM [models/aptm.py: get_matching_loss_attr, random.sample(..., 5)]
APL_WEIGHT = 0.8  # β of E9, `t` in [configs/Retrieval_gene.yaml]
EDA_WEIGHT = 0.8  # weight of the EDA caption terms in E10/E11 [models/model_retrieval.py]
MLM_IGNORE_INDEX = -100  # padded masked_ids in MLM/MAM targets (spec §2.4)
ATTR_IGNORE_INDEX = -1  # unknown attribute label / prompt target (spec §3.1)


def _in_fp32(loss_fn):
    """Run `loss_fn` with autocast off and its fp16/bf16 tensor arguments cast to fp32 (fp64 stays)."""

    def to_fp32(a):
        return a.float() if torch.is_tensor(a) and a.dtype in (torch.float16, torch.bfloat16) else a

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        device_type = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a)).device.type
        with torch.autocast(device_type, enabled=False):
            return loss_fn(*map(to_fp32, args), **{name: to_fp32(a) for name, a in kwargs.items()})

    return wrapper


def _smoothed_nll(logits, target, epsilon, ignore_index):
    """Per-row label-smoothed negative log-likelihood over the last dim, 0 on ignored rows.

    logits (..., C), target (...) -> (row_loss (...), valid (...)). Ignored rows have their logits
    replaced by 0 before the softmax, so whatever they hold gets exactly zero gradient.
    """
    num_classes = logits.shape[-1]
    valid = target != ignore_index  # (...)
    z = torch.where(valid[..., None], logits, 0.0)  # (..., C)
    y = torch.where(valid, target, 0).long()  # (...)
    # one-hot of y by comparison: F.one_hot reads y's min and max back to the host (on a CPU)
    one_hot = (y[..., None] == torch.arange(num_classes, device=y.device)).to(z.dtype)  # (..., C)
    q = (1 - epsilon) * one_hot + epsilon / num_classes  # (..., C)
    row_loss = -(q * F.log_softmax(z, dim=-1)).sum(-1)  # (...)
    return torch.where(valid, row_loss, 0.0), valid


# ---------------------------------------------------------------------------------------------------
# Image–text streams: ITC, ITM, MLM (spec §2.2–2.4)
# ---------------------------------------------------------------------------------------------------


@_in_fp32
def itc_loss(image_feat, text_feat, pid, tau):
    """(E1) Image–text contrastive loss with identity-aware soft targets (spec §2.2).

        z_ij = v_i · t_j / τ,   m_ij = 1[y_i = y_j],   q_ij = m_ij / Σ_j m_ij
        L_itc = ½ [ −(1/B) Σ_i Σ_j q_ij log softmax_j(z_i·) − (1/B) Σ_j Σ_i q_ji log softmax_i(z_·j) ]

    | symbol | argument   | shape  | note                                               |
    |--------|------------|--------|----------------------------------------------------|
    | v_i    | image_feat | (B, D) | vision_proj output; L2-normalised here             |
    | t_j    | text_feat  | (B, D) | text_proj output; L2-normalised here               |
    | y_i    | pid        | (B,)   | identity (pre-training: unique per image)          |
    | τ      | tau        | ()     | learnable temperature `temp` (no clamp)            |

    B is the gathered batch when the caller gathers across GPUs. With unique pids the targets are
    one-hot and this is plain InfoNCE. Official code: the same q for both directions (m is
    symmetric), as written here [models/aptm.py: get_contrastive_loss].
    """
    v = F.normalize(image_feat, dim=-1)  # (B, D)
    t = F.normalize(text_feat, dim=-1)  # (B, D)
    z = v @ t.T / tau  # (B, B)
    m = (pid[:, None] == pid[None, :]).float()  # (B, B)
    q = m / m.sum(dim=1, keepdim=True)  # (B, B)
    loss_i2t = -(q * F.log_softmax(z, dim=1)).sum(dim=1).mean()
    loss_t2i = -(q * F.log_softmax(z.T, dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def categorical_noise(shape, generator):
    """Exp(1) draws for `sample_categorical`, from `generator` and on its device.

    Kept apart from the sampling so that a caller can draw every random number of a step first, in eager mode
    (torch.compile cannot trace an op that takes a Generator), and pass the draws into a compiled graph.
    """
    return torch.empty(shape, device=generator.device).exponential_(generator=generator)


def sample_categorical(weights, noise):
    """One index per row, drawn with probability w_c / Σ_c w_c: argmax_c w_c / E_c with E_c ~ Exp(1) i.i.d.

    weights (..., C) ≥ 0 with a positive entry in every row; noise (..., C) from `categorical_noise`. The
    exponential race (equivalently the Gumbel-max trick, log w_c − log E_c): E_c / w_c ~ Exp(w_c), and the
    smallest of independent exponentials is the c-th with probability w_c / Σ w. It replaces
    torch.multinomial, which reads scalars back to the host (two syncs a call on a GPU) and breaks a
    compiled graph. Zero weights are never drawn (score −1, below every w/E ≥ 0). Returns (...) long.
    """
    score = (weights / noise).masked_fill(weights == 0, -1.0)  # (..., C)
    return score.argmax(dim=-1)  # (...)


@torch.no_grad()
@_in_fp32
def sample_hard_negatives(image_feat, text_feat, pid, tau, generator, uniform=False):
    """Hard negatives for ITM (spec §2.3): one negative image per text, one negative text per image.

        w^{i2t}_bc = softmax_c(v_b · t_c / τ) + 1e-5,   w^{t2i}_bc = softmax_c(t_b · v_c / τ) + 1e-5
        w_bc = 0 where y_b = y_c (the diagonal included)
        ĩ_b ~ Multinomial(w^{t2i}_b·),   t̃_b ~ Multinomial(w^{i2t}_b·)

    | symbol | argument   | shape  |
    |--------|------------|--------|
    | v_b    | image_feat | (B, D) |
    | t_b    | text_feat  | (B, D) |
    | y_b    | pid        | (B,)   |
    | τ      | tau        | ()     |
    | ĩ_b    | returned neg_image_idx | (B,) long |
    | t̃_b    | returned neg_text_idx  | (B,) long |

    `generator`: a torch.Generator on the device of the features, or its draws made beforehand,
    categorical_noise((2, B, B), generator) (row 0 for the images, row 1 for the texts), so that the
    sampling runs inside a compiled graph. Each draw is `sample_categorical` (same distribution as the
    official torch.multinomial). Local batch only (no gather), no gradient, no host sync, fixed shapes.
    Edge case (spec §2.3, a crash in the official code): when the whole batch is a single identity
    every weight row is zero. Our documented fallback, decided on the device without a sync: only the
    diagonal is masked, as in X-VLM's pid-less mining, so each negative is another sample of the same
    person (a false negative, but the step runs). B = 1 has no negative at all and raises ValueError.

    uniform=True (our departure, for training from scratch): every other identity is equally likely,
    w_bc = 1. Measured on the tiny preset: with similarity-weighted negatives from the first step the
    ITM loss never leaves its class prior, because ITC has only learned what the negatives then share.
    """
    batch_size = image_feat.shape[0]
    if batch_size < 2:
        raise ValueError(f"ITM hard negatives need a batch of at least 2 samples, got {batch_size}")
    v = F.normalize(image_feat, dim=-1)  # (B, D)
    t = F.normalize(text_feat, dim=-1)  # (B, D)
    if uniform:
        w_i2t = w_t2i = torch.ones(batch_size, batch_size, device=v.device)  # (B, B)
    else:
        w_i2t = F.softmax(v @ t.T / tau, dim=1) + HARD_NEGATIVE_EPS  # (B, B)
        w_t2i = F.softmax(t @ v.T / tau, dim=1) + HARD_NEGATIVE_EPS  # (B, B)
    same_pid = pid[:, None] == pid[None, :]  # (B, B)
    off_diagonal = ~torch.eye(batch_size, dtype=torch.bool, device=same_pid.device)  # (B, B)
    masked = same_pid & ~(same_pid.all() & off_diagonal)  # (B, B) single-identity fallback: diagonal only
    w_i2t = w_i2t.masked_fill(masked, 0.0)
    w_t2i = w_t2i.masked_fill(masked, 0.0)
    noise = categorical_noise((2, batch_size, batch_size), generator) if isinstance(generator, torch.Generator) \
        else generator  # (2, B, B)
    neg_image_idx = sample_categorical(w_t2i, noise[0])  # (B,)
    neg_text_idx = sample_categorical(w_i2t, noise[1])  # (B,)
    return neg_image_idx, neg_text_idx


@_in_fp32
def itm_loss(logits, labels):
    """(E2) Image–text matching loss over positives and hard negatives (spec §2.3).

        L_itm = −(1/3B) Σ_n log softmax(s_n)[ℓ_n]

    | symbol | argument | shape   | note                                                         |
    |--------|----------|---------|--------------------------------------------------------------|
    | s_n    | logits   | (3B, 2) | itm_head(X(T, I)[0]); index 1 = match                        |
    | ℓ_n    | labels   | (3B,)   | [1]*B for (I_b, T_b), [0]*2B for (ĩ_b, T_b) and (I_b, t̃_b) |

    Same as the official `F.cross_entropy(output, itm_labels)`.
    """
    return F.cross_entropy(logits, labels)


@_in_fp32
def mlm_loss(logits, labels):
    """(E3) Masked language modelling conditioned on the image (spec §2.4).

        L_mlm = −mean_{(b,p) valid} log p_θ(x_bp | x̂_b, I_b)

    | symbol        | argument | shape     | note                                   |
    |---------------|----------|-----------|----------------------------------------|
    | log p_θ(·)    | logits   | (B, M, V) | MLM head at the masked positions       |
    | x_bp          | labels   | (B, M)    | original ids; −100 = padding, ignored  |

    Mean over the valid targets, as `F.cross_entropy(ignore_index=-100)`. Departure (our choice):
    with no valid target the loss is 0 instead of NaN (this happens only for an empty MAM batch).
    """
    nll = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=MLM_IGNORE_INDEX,
                          reduction="none")  # (B·M,) zero at ignored positions
    num_valid = (labels != MLM_IGNORE_INDEX).sum()
    return nll.sum() / num_valid.clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Attribute-prompt streams: IAC, IAM, MAM (spec §2.5–2.8)
# ---------------------------------------------------------------------------------------------------


@_in_fp32
def smoothed_cross_entropy(logits, target, epsilon, ignore_index=ATTR_IGNORE_INDEX):
    """(E7) Label-smoothed cross-entropy over the valid rows (spec §2.8).

        q_nc = (1 − ε) · 1[c = y_n] + ε / C
        L_ls = (1/N) Σ_{n valid} Σ_c −q_nc log softmax(z_n)_c ,   L_ls = 0 if N = 0

    | symbol | argument     | shape  | note                                        |
    |--------|--------------|--------|---------------------------------------------|
    | z_n    | logits       | (N, C) |                                             |
    | y_n    | target       | (N,)   | rows equal to ignore_index are left out     |
    | ε      | epsilon      | ()     | 0.4 in pre-training gives targets 0.8 / 0.2 |
    | N      | —            | —      | the number of valid rows                    |

    ε = 0 is plain cross-entropy with ignore_index, except when every row is ignored: PyTorch
    returns NaN there, the official smoothed path returns 0, and we return 0 for every ε (our
    choice: one rule, no NaN in training) [models/aptm.py: CrossEntropyLabelSmooth, label_smooth_loss].
    """
    row_loss, valid = _smoothed_nll(logits, target, epsilon, ignore_index)  # (N,), (N,)
    return row_loss.sum() / valid.sum().clamp(min=1)


@_in_fp32
def iac_loss(image_feat, prompt_feat, attr_labels, tau, label_smoothing=0.0):
    """(E4) Image–attribute contrastive loss (spec §2.5).

        Z_bt = v_b · a_t / τ
        CE_k = (1/N_k) Σ_{b: a_bk ≠ −1} L_ls(Z_{b,2k:2k+2}, a_bk)   (E7; ε = 0 is plain CE)
        L_iac = (1/K) Σ_k CE_k

    | symbol | argument        | shape   | note                                        |
    |--------|-----------------|---------|---------------------------------------------|
    | v_b    | image_feat      | (B, D)  | L2-normalised here                          |
    | a_t    | prompt_feat     | (P, D)  | prompt order 2k (label 0), 2k+1 (label 1)   |
    | a_bk   | attr_labels     | (B, K)  | {0, 1, −1}; −1 = unknown, ignored           |
    | τ      | tau             | ()      | the same temperature as ITC                 |
    | ε      | label_smoothing | ()      | 0.4 in pre-training, 0 otherwise            |
    | N_k    | —               | —       | images with a_bk ≠ −1                       |

    Local batch, no gather. The divisor is always K, even for attributes without a valid row
    (their CE_k is 0). Official code: without smoothing an attribute whose labels are all −1 gives
    NaN (`F.cross_entropy(ignore_index=-1)`); ours gives 0 (see `smoothed_cross_entropy`).
    The official loop over k is one batched computation here.
    """
    num_attributes = attr_labels.shape[1]
    v = F.normalize(image_feat, dim=-1)  # (B, D)
    a = F.normalize(prompt_feat, dim=-1)  # (P, D)
    z = (v @ a.T / tau).unflatten(1, (num_attributes, 2))  # (B, K, 2) pairs (Z_b,2k, Z_b,2k+1)
    row_loss, valid = _smoothed_nll(z, attr_labels, label_smoothing, ATTR_IGNORE_INDEX)  # (B, K), (B, K)
    ce = row_loss.sum(dim=0) / valid.sum(dim=0).clamp(min=1)  # (K,)
    return ce.sum() / num_attributes


def sample_iam_prompts(num_prompts, generator, k=IAM_NUM_PROMPTS):
    """The k distinct prompt indices drawn uniformly for IAM this step (spec §2.6; `random.sample`).

    Returns a (k,) long tensor on the generator's device. The same prompts serve the whole batch.
    """
    if not 0 < k <= num_prompts:
        raise ValueError(f"cannot draw {k} distinct prompts out of {num_prompts}")
    return torch.randperm(num_prompts, generator=generator, device=generator.device)[:k]  # (k,)


@_in_fp32
def iam_loss(logits, targets, label_smoothing=0.0, num_prompts=IAM_NUM_PROMPTS):
    """(E5) Image–attribute matching loss (spec §2.6).

        CE_t = (1/N_t) Σ_{b: m_bt ≠ −1} L_ls(s(b, t), m_bt)   (E7; ε = 0 is plain CE)
        L_iam = (1/S) Σ_{t ∈ 𝒮} CE_t

    | symbol  | argument        | shape    | note                                              |
    |---------|-----------------|----------|---------------------------------------------------|
    | s(b, t) | logits          | (S·B, 2) | itm_head(X(prompt_t, I_b)[0]); prompt-major rows  |
    | m_bt    | targets         | (S·B,)   | {1 true, 0 opposite true, −1 unknown}             |
    | ε       | label_smoothing | ()       | 0.4 in pre-training, 0 otherwise                  |
    | S       | num_prompts     | int      | |𝒮| = 5 prompts drawn by `sample_iam_prompts`     |
    | N_t     | —               | —        | images with m_bt ≠ −1                             |

    Row s·B + b holds (prompt 𝒮_s, image b): the caller flattens a (S, B) grid. As in the official
    loop over the 5 prompts, each prompt's CE is a mean over its own valid images and the 5 are
    averaged with divisor 5. Official code: a prompt whose B targets are all −1 gives NaN without
    smoothing and 0 with it; ours gives 0 [models/aptm.py: get_matching_loss_attr].
    """
    s = logits.unflatten(0, (num_prompts, -1))  # (S, B, 2)
    m = targets.unflatten(0, (num_prompts, -1))  # (S, B)
    row_loss, valid = _smoothed_nll(s, m, label_smoothing, ATTR_IGNORE_INDEX)  # (S, B), (S, B)
    ce = row_loss.sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # (S,)
    return ce.sum() / num_prompts


def sample_mam_images(prompt_targets, generator):
    """The conditioning image of each prompt for MAM (spec §2.7), at a fixed shape.

    For every prompt t with at least one true image (m_bt = 1; −1 counts as false), one of those
    images uniformly at random. Vectorised: each (b, t) gets a uniform score in [0, 1), false pairs
    get −1, and the argmax over b is the chosen image. The spec drops prompts without a true image;
    here every prompt keeps its row and `has_true` says which rows count (the caller gives the others
    zero weight, `mam_targets`), so no shape depends on the data and nothing waits for the device.

    | symbol | argument       | shape  |
    |--------|----------------|--------|
    | m_bt   | prompt_targets | (B, P) |
    | —      | returned image_idx | (P,) long; for a prompt without a true image an arbitrary image |
    | —      | returned has_true  | (P,) bool |

    `generator` must live on the device of `prompt_targets`.
    """
    is_true = prompt_targets == 1  # (B, P)
    score = torch.rand(is_true.shape, generator=generator, device=prompt_targets.device)  # (B, P)
    image_idx = score.masked_fill(~is_true, -1.0).argmax(dim=0)  # (P,)
    return image_idx, is_true.any(dim=0)


def mam_targets(prompt_masked_labels, has_true):
    """MAM targets at a fixed shape (spec §2.7): the rows of prompts without a true image are ignored
    (−100 everywhere), which gives the same L_mam as dropping them. (P, M), (P,) -> (P, M)."""
    return prompt_masked_labels.masked_fill(~has_true[:, None], MLM_IGNORE_INDEX)  # (P, M)


def mam_loss(logits, labels):
    """(E6) Masked attribute (prompt) modelling: E3 on the (masked prompt, chosen image) rows (spec §2.7).

        L_mam = −mean_{(r,p) valid} log p_θ(x_rp | x̂_r, I_r)

    | symbol     | argument | shape     | note                                          |
    |------------|----------|-----------|-----------------------------------------------|
    | log p_θ(·) | logits   | (R, M, V) | MLM head on masked prompt r with its image    |
    | x_rp       | labels   | (R, M)    | original prompt ids; −100 = padding, ignored  |

    The training code passes all R = P prompts, those without a true image with every label −100
    (`mam_targets`). No label smoothing (spec §2.8). 0 when there is nothing to predict (the official
    code crashes).
    """
    return mlm_loss(logits, labels)


# ---------------------------------------------------------------------------------------------------
# Total objectives (spec §2.9)
# ---------------------------------------------------------------------------------------------------


def pretrain_objective(itc, itm, mlm, iac, iam, mam, beta=APL_WEIGHT):
    """(E8, E9) MALS pre-training objective.

        L_apl = (L_iac + L_iam + L_mam) / 3                        (E8)
        L_pre = L_itc + L_itm + L_mlm + β · L_apl                  (E9)

    Returns every term, "apl" and "total". β = 0.8 (`t` in the official config): each attribute loss
    weighs 0.8/3 ≈ 0.267 [trains.py: train_attr; models/model_retrieval.py].
    """
    apl = (iac + iam + mam) / 3
    total = itc + itm + mlm + beta * apl
    return {"itc": itc, "itm": itm, "mlm": mlm, "iac": iac, "iam": iam, "mam": mam, "apl": apl, "total": total}


def finetune_objective(itc, itc_eda, itm, itm_eda, mlm, eda_weight=EDA_WEIGHT):
    """(E10–E12) Retrieval fine-tuning objective (CUHK-PEDES, ICFG-PEDES, RSTPReid).

        L_itc^ft = L_itc(v, t) + 0.8 · L_itc(v, t^eda)             (E10)
        L_itm^ft = L_itm(I, T) + 0.8 · L_itm(I, T^eda)             (E11)
        L_ft = L_itc^ft + L_itm^ft + L_mlm                         (E12)

    Returns every term and "total". MLM runs on the original caption only; no attribute losses
    [models/model_retrieval.py].
    """
    total = (itc + eda_weight * itc_eda) + (itm + eda_weight * itm_eda) + mlm
    return {"itc": itc, "itc_eda": itc_eda, "itm": itm, "itm_eda": itm_eda, "mlm": mlm, "total": total}


def pa100k_objective(iac, iam, mam):
    """(E13) PA-100K fine-tuning objective: L_pa = L_iac + L_iam + L_mam.

    26 attributes, 52 prompts, no label smoothing, weights 1 [train_pa100ks.py]. Returns every term
    and "total".
    """
    return {"iac": iac, "iam": iam, "mam": mam, "total": iac + iam + mam}
