"""Speed and memory of minAPTM at paper scale: one training step and a CUHK-PEDES-sized evaluation (DESIGN.md §7).

A benchmark, never a test: random images and token ids, random weights, the real code paths
(pretrain.PretrainObjective, finetune.FinetuneObjective, model.optimizer_groups + AdamW as in
pretrain.make_optimizer, evaluate.evaluate_retrieval).

    python bench.py                                      # GPU: aptm-base, fine-tune @120, pre-train @150, eval
    python bench.py --modes bf16,bf16-compile --json out/bench.json
    python bench.py --no-eval --steps 20                 # training steps only
    python bench.py --smoke                              # tiny preset on a CPU, about a minute (what CI could run)

Per objective and mode it prints ms/step, pairs/s (image–caption pairs of the batch per second; fine-tuning's EDA
copies are not counted) and its ratio to the official code's (OFFICIAL_PAIRS_PER_S; the goal is 4x), peak memory
(CUDA only) and model-FLOPs utilisation (MFU): analytic FLOPs per step ÷
time ÷ the GPU's dense bf16 peak (PEAK_BF16_TFLOPS; every mode is measured against the bf16 peak, so fp32/TF32
rows show how far they are from what bf16 could reach). Then, per objective, the checks that decide whether a GPU
step can run without waiting for the host: the count of sync-forcing ops over one step (SyncCounter, on any
device), whether objective.losses compiles as one graph (compile_check), and on a GPU one step under
torch.cuda.set_sync_debug_mode("error"); the input pipeline's samples/s for each DataLoader worker count; and the
evaluation: seconds for the features (image decoding included), for ITM re-ranking, in total.

Modes: fp32 (no TF32 anywhere), tf32 (TF32 matmuls and convolutions), bf16 (bf16 autocast as the training scripts
run it), bf16-compile (the same with every Swin block and BERT layer under torch.compile, see compiled_layers).
On a CPU, tf32 equals fp32; bf16 is slow on CPUs without bf16 units and compilation takes minutes there.

FLOP counting convention (finetune_step_flops, pretrain_step_flops and the *_macs helpers): multiply–accumulates
of every linear layer, convolution and attention matmul (QKᵀ and AV) of the forward pass, FLOPs = 2 × MACs, and a
training step costs 3 × the forward (the backward computes gradients for inputs and weights: 2 × forward). Norms,
softmax, GELU, embedding look-ups, the losses and the optimizer are not counted. The work is counted as the code
does it (each image's cross-attention keys/values projected once and shared by its pairs; the last fusion layer
at [CLS] alone for ITM and at the M masked slots, padding included, for MLM, which runs its head there; MAM on all P
prompts), not as it could be done. Spec §1.6: Swin-B@384×128 ≈ 15.2 GMACs, text encoder (L=56) ≈ 2.4 GMACs, cross
encoder per pair ≈ 3.3 GMACs (test_all.py: test_flop_counter_by_hand).

Shapes: B batch, L text tokens, N image tokens, Dv/Dt vision/text widths, M masked positions, V vocabulary,
P prompts, Q queries, G gallery images.
"""
import argparse
import json
import math
import os
import random
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import numpy as np
import torch
import torch.utils._python_dispatch
from PIL import Image

from attributes import MALS_PROMPTS
from data import (NORMALIZATION, PROMPT_MASK_KEYS, SPECIAL_TOKENS, PretrainDataset, PromptMasking, TestSet, Tokenizer,
                  mask_tokens, split_prompt_rows, train_transform)
from evaluate import evaluate_retrieval
from finetune import FinetuneObjective
from losses import APL_WEIGHT, EDA_WEIGHT, IAM_NUM_PROMPTS
from model import ADAMW_BETAS, ADAMW_EPS, APTM, CONFIGS, optimizer_groups
from pretrain import PRESET_DEFAULTS, NonFiniteWatch, PretrainObjective

MODES = ("fp32", "tf32", "bf16", "bf16-compile")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, matched in this order against
# torch.cuda.get_device_name (e.g. "NVIDIA H100 80GB HBM3"); an unlisted GPU or a CPU prints n/a.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)

# The official code on one H200, TF32, at the paper's batch per GPU (issue "Speed at paper scale"): pairs/s. The goal
# is SPEED_GOAL x these with bf16: >= 1,170 pairs/s fine-tuning at batch 120, >= 900 pre-training at batch 150.
OFFICIAL_PAIRS_PER_S = {"finetune": 292.0, "pretrain": 223.0}
SPEED_GOAL = 4.0

BERT_VOCAB_SIZE = 30522  # bert-base-uncased (spec §1.3): the MLM decoder's width, so it sets the MLM cost
TINY_VOCAB_SIZE = 720  # the order of the synthetic world's offline vocabulary (our choice)
CUHK_TEST = dict(queries=6156, images=3074, identities=1000)  # CUHK-PEDES test split (spec §4.5)
SMOKE_TEST = dict(queries=48, images=24, identities=8)
CAPTION_WORDS = (12, 40)  # words per random caption; CUHK-PEDES captions average ~23 words (our choice)
SOURCE_IMAGE_SIZE = (160, 64)  # (H, W) of the random JPEGs; CUHK-PEDES crops are small and get upscaled (ours)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to measure
    parser.add_argument("--preset", default="aptm-base", choices=sorted(CONFIGS), help="model size (model.py)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, small batches, 2 steps: a CPU run "
                        "of the same code in under a minute")
    parser.add_argument("--modes", help=f"comma-separated, from {','.join(MODES)} (default: all on a GPU; "
                        "fp32,bf16 with --smoke)")
    parser.add_argument("--objectives", default="finetune,pretrain", help="comma-separated: finetune, pretrain")
    # training step (spec §5.3: 120 per GPU for fine-tuning, 150 for pre-training)
    parser.add_argument("--batch-finetune", type=int, help="default 120 (paper, per GPU); 8 with --smoke")
    parser.add_argument("--batch-pretrain", type=int, help="default 150 (paper, per GPU); 8 with --smoke")
    parser.add_argument("--steps", type=int, help="timed steps per mode (default 10; 2 with --smoke)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, incl. compilation (default 3; 1 smoke)")
    parser.add_argument("--adam", default="fused", choices=["foreach", "fused"],
                        help="AdamW implementation on a GPU; fused is what the training scripts use there")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (APTM.checkpointing)")
    parser.add_argument("--no-checks", action="store_true", help="skip the sync count, the whole-graph compile check "
                        "and (GPU) the sync-debug step")
    # input pipeline (pre-training samples from JPEGs through the DataLoader)
    parser.add_argument("--pipeline-workers", default="0,1,2", help="comma-separated DataLoader worker counts; "
                        "empty: skip the input-pipeline benchmark")
    parser.add_argument("--pipeline-batches", type=int, default=4, help="timed batches per worker count (after the "
                        "first, which includes the workers' start-up)")
    # evaluation (spec §6): CUHK-PEDES test split sizes, top-128 re-rank
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation benchmark")
    parser.add_argument("--eval-queries", type=int, help=f"default {CUHK_TEST['queries']} (CUHK-PEDES test)")
    parser.add_argument("--eval-images", type=int, help=f"default {CUHK_TEST['images']} (CUHK-PEDES test)")
    parser.add_argument("--k-rerank", type=int, help="images re-ranked per query (default 128, k_test; 8 smoke)")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="images per encoder batch "
                        "(evaluate.py default)")
    parser.add_argument("--eval-pair-batch", type=int, default=1024, help="ITM pairs per forward "
                        "(evaluate.py default)")
    parser.add_argument("--eval-workers", type=int, help="image-decoding processes (default 4; 0 with --smoke)")
    # system
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)

    smoke = args.smoke
    if smoke:
        args.preset = "tiny"
    defaults = dict(modes="fp32,bf16" if smoke else ",".join(MODES), batch_finetune=8 if smoke else 120,
                    batch_pretrain=8 if smoke else 150, steps=2 if smoke else 10, warmup=1 if smoke else 3,
                    eval_queries=SMOKE_TEST["queries"] if smoke else CUHK_TEST["queries"],
                    eval_images=SMOKE_TEST["images"] if smoke else CUHK_TEST["images"],
                    k_rerank=8 if smoke else 128, eval_workers=0 if smoke else 4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        args.pipeline_workers = [int(w) for w in args.pipeline_workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--pipeline-workers must be comma-separated integers")
    if any(w < 0 for w in args.pipeline_workers) or args.pipeline_batches < 1:
        parser.error("--pipeline-workers must be at least 0 and --pipeline-batches at least 1")
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes must name some of {', '.join(MODES)}")
    if not set(args.objectives) <= {"finetune", "pretrain"}:
        parser.error("--objectives must name finetune and/or pretrain")
    if min(args.batch_finetune, args.batch_pretrain) < 2:
        parser.error("batches need at least 2 samples: ITM draws an in-batch negative (spec §2.3)")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if min(args.eval_queries, args.eval_images, args.k_rerank) < 1 or args.eval_workers < 0:
        parser.error("evaluation sizes must be at least 1 and --eval-workers at least 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but no GPU is visible (use --smoke or --device cpu)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs (convention in the module docstring)


def linear_macs(tokens, d_in, d_out):
    """Multiply–accumulates of a Linear(d_in → d_out) on `tokens` rows."""
    return tokens * d_in * d_out


def attention_macs(q_len, kv_len, width):
    """QKᵀ and AV of multi-head attention, all heads together (width = heads × head_dim)."""
    return 2 * q_len * kv_len * width


def swin_macs(config):
    """Per image: patch embedding, every block's qkv, window attention, proj and MLP, the patch mergings."""
    H, W = (s // config.patch_size for s in config.image_size)
    macs = linear_macs(H * W, 3 * config.patch_size ** 2, config.swin_dim)  # the patch conv as a linear
    for i, depth in enumerate(config.depths):
        C, h, w = config.swin_dim * 2 ** i, H // 2 ** i, W // 2 ** i
        tokens, window = h * w, min(config.window_size, h, w)
        hidden = int(C * config.mlp_ratio)
        block = (linear_macs(tokens, C, 3 * C) + attention_macs(tokens, window * window, C)
                 + linear_macs(tokens, C, C) + linear_macs(tokens, C, hidden) + linear_macs(tokens, hidden, C))
        macs += depth * block
        if i < len(config.depths) - 1:
            macs += linear_macs(tokens // 4, 4 * C, 2 * C)  # PatchMerging reduction
    return macs


def bert_layer_macs(config, length, queries=None):
    """One BERT self-attention + FFN layer on one sequence of `length` tokens; with `queries`, only that many
    positions are computed (their queries, attention rows and FFN; keys and values still on every token)."""
    Dt, Di = config.hidden_size, config.intermediate_size
    q = length if queries is None else queries
    return (linear_macs(q, Dt, Dt) + linear_macs(length, Dt, 2 * Dt) + attention_macs(q, length, Dt)
            + linear_macs(q, Dt, Dt) + linear_macs(q, Dt, Di) + linear_macs(q, Di, Dt))


def text_macs(config, length):
    """Text encoder ('text' mode) on one sequence."""
    return config.num_text_layers * bert_layer_macs(config, length)


def image_tokens(config):
    """N: the mean token plus the last Swin stage's grid."""
    H, W = (s // config.patch_size // 2 ** (len(config.depths) - 1) for s in config.image_size)
    return 1 + H * W


def fusion_layer_macs(config, length, queries=None):
    """One fusion layer on one pair, the image's keys/values given: bert_layer_macs plus the cross-attention's
    query, attention and output on the computed positions."""
    Dt, N = config.hidden_size, image_tokens(config)
    q = length if queries is None else queries
    return (bert_layer_macs(config, length, queries) + linear_macs(q, Dt, Dt) + attention_macs(q, N, Dt)
            + linear_macs(q, Dt, Dt))


def cross_macs(config, length):
    """Cross encoder ('fusion' mode) on one (text, image) pair, the image's keys/values projected for the pair."""
    return config.num_cross_layers * fusion_layer_macs(config, length) + kv_macs(config)


def kv_macs(config):
    """One image's cross-attention keys and values in every fusion layer (model.cross_kv)."""
    return config.num_cross_layers * linear_macs(image_tokens(config), config.vision_width, 2 * config.hidden_size)


def pair_macs(config, length, queries=None):
    """Cross encoder on one pair whose image keys/values were projected once per image (cross_kv), as training
    does. With `queries`, the last layer computes that many positions alone, as model.encode_cross(positions=...)
    does: ITM 1 ([CLS]), MLM the M masked ones."""
    if config.num_cross_layers == 0:
        return 0
    return ((config.num_cross_layers - 1) * fusion_layer_macs(config, length)
            + fusion_layer_macs(config, length, queries))


def itm_head_macs(config):
    Dt = config.hidden_size
    return linear_macs(1, Dt, 2 * Dt) + linear_macs(1, 2 * Dt, 2)


def mlm_macs(config, length, masked):
    """MLM forward ('multi_modal' mode) of one row: text + cross encoder (image keys/values given; its last layer
    at the `masked` positions alone), then the head there."""
    Dt = config.hidden_size
    head = linear_macs(masked, Dt, Dt) + linear_macs(masked, Dt, config.vocab_size)
    return text_macs(config, length) + pair_macs(config, length, masked) + head


def finetune_step_flops(config, batch_size, masked=10):
    """E10–E12 on one batch: images once (with their cross-attention keys/values); caption and EDA copy each
    through the text encoder, ITC and ITM on 3B pairs (positives, text-negatives, image-negatives); MLM on the
    caption. × 2 FLOPs/MAC × 3 for the backward."""
    B, L, Dv, Dt, D = batch_size, config.max_tokens, config.vision_width, config.hidden_size, config.embed_dim
    per_caption_set = (B * text_macs(config, L) + linear_macs(B, Dt, D) + linear_macs(B, D, B)  # ITC logits
                       + 3 * B * (pair_macs(config, L, 1) + itm_head_macs(config)))
    forward = (B * (swin_macs(config) + kv_macs(config)) + linear_macs(B, Dv, D) + 2 * per_caption_set
               + B * mlm_macs(config, L, masked))
    return 3 * 2 * forward


def pretrain_step_flops(config, batch_size, prompt_len, num_prompts, mam_rows, masked=10):
    """E9 on one batch: ITC/ITM/MLM as fine-tuning's caption stream, plus the P prompts through the text encoder
    (IAC), S·B prompt–image pairs through the cross encoder (IAM) and MLM on `mam_rows` prompts (MAM: all P, those
    without a true image weighted zero)."""
    B, L, Dv, Dt, D = batch_size, config.max_tokens, config.vision_width, config.hidden_size, config.embed_dim
    S, P = IAM_NUM_PROMPTS, num_prompts
    forward = (B * (swin_macs(config) + kv_macs(config)) + linear_macs(B, Dv, D)
               + B * text_macs(config, L) + linear_macs(B, Dt, D) + linear_macs(B, D, B)
               + 3 * B * (pair_macs(config, L, 1) + itm_head_macs(config))
               + B * mlm_macs(config, L, masked)
               + P * text_macs(config, prompt_len) + linear_macs(P, Dt, D) + linear_macs(B, D, P)  # IAC
               + S * B * (pair_macs(config, prompt_len, 1) + itm_head_macs(config))  # IAM
               + mam_rows * mlm_macs(config, prompt_len, masked))  # MAM
    return 3 * 2 * forward


# ----------------------------------------------------------------------------------------------------------------
# Random inputs


def bench_tokenizer(vocab_size):
    """The prompts' words (so PretrainObjective tokenises them as a real vocabulary would), padded with
    placeholder words to `vocab_size` entries (30,522 for aptm-base: the MLM decoder's real width)."""
    vocab = Tokenizer.from_corpus(MALS_PROMPTS).vocab
    if len(vocab) > vocab_size:
        raise ValueError(f"the prompts need {len(vocab)} word pieces, more than {vocab_size}")
    return Tokenizer(vocab + [f"word{i}" for i in range(vocab_size - len(vocab))])


def random_captions(tokenizer, batch_size, max_tokens, generator):
    """input_ids, attention_mask (B, L): [CLS], random non-special ids, then [PAD]; lengths as CAPTION_WORDS."""
    low, high = CAPTION_WORDS
    lengths = 1 + torch.randint(low, high + 1, (batch_size,), generator=generator).clamp(max=max_tokens - 1)  # (B,)
    positions = torch.arange(max_tokens)  # (L,)
    attention_mask = (positions[None, :] < lengths[:, None]).long()  # (B, L)
    words = torch.randint(len(SPECIAL_TOKENS), tokenizer.vocab_size, (batch_size, max_tokens), generator=generator)
    input_ids = torch.where(attention_mask.bool(), words, tokenizer.pad_id)  # (B, L)
    input_ids[:, 0] = tokenizer.cls_id
    return input_ids, attention_mask


def random_batch(objective_name, config, tokenizer, batch_size, device, seed):
    """One batch with the keys the objective reads; masked once here, outside the timed loop."""
    generator = torch.Generator().manual_seed(seed)
    B, L = batch_size, config.max_tokens
    input_ids, attention_mask = random_captions(tokenizer, B, L, generator)  # (B, L)
    masked_ids, masked_pos, masked_labels = mask_tokens(input_ids, tokenizer, generator)  # (B, L), (B, M), (B, M)
    norm = torch.tensor(NORMALIZATION["cuhk" if objective_name == "finetune" else "mals"])  # (2, 3)
    batch = dict(image=torch.randint(0, 256, (B, 3, *config.image_size), generator=generator, dtype=torch.uint8),
                 erase=torch.zeros(B, 4, dtype=torch.long), norm=norm.expand(B, 2, 3),  # as ImageTransform.for_device
                 input_ids=input_ids, attention_mask=attention_mask, masked_ids=masked_ids,
                 masked_pos=masked_pos, masked_labels=masked_labels)
    if objective_name == "finetune":
        batch["eda_input_ids"], batch["eda_attention_mask"] = random_captions(tokenizer, B, L, generator)
        batch["pid"] = torch.randint(0, 4 * B, (B,), generator=generator)  # a few shared identities, as in CUHK
    else:
        batch["pid"] = torch.arange(B)  # MALS: one identity per image (spec §2.1)
        num_attributes = len(MALS_PROMPTS) // 2
        batch["attr_label"] = torch.randint(-1, 2, (B, num_attributes), generator=generator)  # (B, K) in {-1, 0, 1}
        masking = PromptMasking(tokenizer, MALS_PROMPTS, config.max_tokens)  # as the data-loader workers do
        for key, rows in zip(PROMPT_MASK_KEYS, masking(generator)):
            batch[key] = split_prompt_rows(rows, B)  # (B, r, ...)
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Training step


def set_precision(mode, device):
    """Matmul/convolution precision and the autocast context of `mode`."""
    tf32 = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if mode.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def compiled_layers(model):
    """Swap every Swin block and BERT/fusion layer for its torch.compile'd version, and back afterwards.

    Layers rather than the whole objective: the objective's `losses` does compile whole (fullgraph, see
    compile_check), but one whole-model graph compiles for many minutes with inductor, while identical layers
    share one compiled graph. Shapes vary (B, 3B and 5B rows, 56 or prompt-length tokens), so dynamic shapes are
    left to torch's automatic choice.
    """
    holders = [stage.blocks for stage in model.vision_encoder.layers] + [model.text_encoder.bert.encoder.layer]
    originals = [list(holder) for holder in holders]
    # Swin blocks differ in Python constants dynamo guards on (stage grid, window, shift, whether drop-path is
    # on), so SwinBlock.forward compiles once per variant: about 9 for Swin-B, above dynamo's default limit of 8,
    # past which the rest would run eagerly.
    recompile_limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(recompile_limit, 2 * sum(len(h) for h in holders))
    for holder in holders:
        for i, layer in enumerate(list(holder)):
            holder[i] = torch.compile(layer)
    try:
        yield
    finally:
        torch._dynamo.config.recompile_limit = recompile_limit
        for holder, layers in zip(holders, originals):
            for i, layer in enumerate(layers):
                holder[i] = layer


# ops that make the host wait for the device (on a GPU): they return a value to Python or an output whose shape
# depends on the data. Boolean-mask indexing (x[mask], x[mask] = y) is nonzero in disguise and counted too.
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "argwhere", "masked_select",
            "multinomial", "unique_consecutive", "_unique", "_unique2", "unique_dim", "bincount"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the sync-forcing aten ops (SYNC_OPS, boolean-mask indexing, repeat_interleave with tensor repeats and
    no output_size) that run under it, forward and backward, on any device: a CPU run finds what would stall a
    GPU. Device-to-host copies (.cpu(), .tolist()) are not visible on a CPU and not counted.

        with SyncCounter() as syncs:
            objective(batch, generator, 0.0)["total"].backward()
        syncs.counts  # Counter({op name: calls}); syncs.ops: every op seen
    """

    def __init__(self):
        super().__init__()
        self.counts, self.ops = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        self.ops += 1
        bool_index = name in INDEX_OPS and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        tensor_repeats = (name == "repeat_interleave" and torch.is_tensor(args[0 if len(args) == 1 else 1])
                          and kwargs.get("output_size") is None and len(args) < 4)
        if name in SYNC_OPS or bool_index or tensor_repeats:
            self.counts[name] += 1
        return func(*args, **kwargs)


class Timer:
    """Wall time of a region: CUDA events on a GPU (queued with the work), perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


def bench_training(objective_name, model, tokenizer, args, device, peak_tflops):
    """Every mode of one objective: dict mode -> numbers."""
    config = model.config
    batch_size = args.batch_finetune if objective_name == "finetune" else args.batch_pretrain
    batch = random_batch(objective_name, config, tokenizer, batch_size, device, args.seed)
    objective = build_objective(objective_name, model, tokenizer, device)
    if objective_name == "finetune":
        double_lr = "finetune"
        flops = finetune_step_flops(config, batch_size, masked=batch["masked_pos"].shape[1])
    else:
        double_lr = "cross"
        flops = pretrain_step_flops(config, batch_size, objective.prompts.prompt_ids.shape[1], len(MALS_PROMPTS),
                                    len(MALS_PROMPTS), masked=batch["masked_pos"].shape[1])
    model.train()
    results = {}
    for mode in args.modes:
        # built before any compiled layer is swapped in, so the parameter names (and groups) are the model's own
        optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01, 1e-4, double_lr=double_lr), lr=1e-4,
                                      betas=ADAMW_BETAS, eps=ADAMW_EPS, **{args.adam: device.type == "cuda"})
        try:
            with compiled_layers(model) if mode.endswith("compile") else nullcontext():
                row = time_steps(objective, batch, optimizer, set_precision(mode, device), args, device)
        except torch.OutOfMemoryError:  # e.g. fp32 at the paper's batch: report it, go on with the next mode
            row = dict(error="out of memory")
        finally:
            del optimizer
            model.zero_grad(set_to_none=True)
        if "error" in row:
            print(f"{objective_name} {mode}: {row['error']}")
        else:
            seconds = row["ms_per_step"] / 1000
            row.update(pairs_per_s=batch_size / seconds, tflops_per_step=flops / 1e12,
                       achieved_tflops=flops / seconds / 1e12,
                       mfu=flops / seconds / (peak_tflops * 1e12) if peak_tflops else None)
            if not math.isfinite(row["loss"]):
                raise RuntimeError(f"{objective_name} {mode}: non-finite loss {row['loss']}")
        results[mode] = dict(batch_size=batch_size, **row)
    return results


def time_steps(objective, batch, optimizer, ctx, args, device):
    """--warmup untimed then --steps timed training steps: ms_per_step, peak_memory_gb, warmup_s, loss."""
    generator = torch.Generator(device).manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        # ---------------- TRAINING STEP (the scripts' update path, without their per-step isfinite sync) -----
        with ctx:
            terms = objective(batch, generator, 0.0)  # the paper's hard negatives
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()  # bf16 needs no GradScaler (pretrain.autocast_setup disables it)
        optimizer.step()
        return terms

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    with Timer(device) as timer:
        for _ in range(args.steps):
            terms = step()
    return dict(ms_per_step=1000 * timer.seconds / args.steps,
                peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                warmup_s=warmup_s, loss=float(terms["total"].detach()))


def build_objective(objective_name, model, tokenizer, device):
    """The paper's objective (hard negatives from the first step; pre-training with the paper's label smoothing)."""
    if objective_name == "finetune":
        return FinetuneObjective(model, EDA_WEIGHT, uniform_negatives=0.0)
    return PretrainObjective(model, tokenizer, MALS_PROMPTS, APL_WEIGHT, PRESET_DEFAULTS["aptm-base"]["label_smoothing"],
                             max_tokens=model.config.max_tokens, uniform_negatives=0.0).to(device)


def count_step_syncs(objective, batch, generator):
    """Sync-forcing ops (SyncCounter) of one training step: the draws, the forward, the loop's non-finite watch
    and the backward. Not the optimizer: on a CPU its step counters are read on the host, as they are (on the
    host) on a GPU; the sync-debug step covers it there."""
    watch = NonFiniteWatch(batch["pid"].device)
    with SyncCounter() as syncs:
        terms = objective(batch, generator, 0.0)
        watch.update(0, terms)
        terms["total"].backward()
    return syncs.counts


def compile_check(objective, batch, generator):
    """torch.compile(objective.losses, fullgraph=True) on the backend "eager" (dynamo's tracing alone, seconds):
    (True, seconds) if the forward and losses form one graph, else (False, the first line of the error)."""
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        torch.compile(objective.losses, fullgraph=True, backend="eager")(batch, *objective.draw(batch, generator, 0.0))
    except Exception as error:  # report it: a benchmark keeps going
        return False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return True, time.perf_counter() - start


def sync_debug_step(objective, model, batch, generator, device):
    """One training step (forward, backward, fused AdamW step) under torch.cuda.set_sync_debug_mode("error"): any
    op that makes the host wait raises. "ok" or the error's first line; None on a CPU."""
    if device.type != "cuda":
        return None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = objective(batch, generator, 0.0)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        return "ok"
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        model.zero_grad(set_to_none=True)


def step_checks(model, tokenizer, args, device):
    """Per objective: the sync count, the whole-graph compile check, and on a GPU the sync-debug step."""
    checks = {}
    model.train()
    for name in args.objectives:
        batch_size = args.batch_finetune if name == "finetune" else args.batch_pretrain
        batch = random_batch(name, model.config, tokenizer, batch_size, device, args.seed)
        objective = build_objective(name, model, tokenizer, device)
        generator = torch.Generator(device).manual_seed(args.seed)
        syncs = count_step_syncs(objective, batch, generator)
        model.zero_grad(set_to_none=True)
        compiled, detail = compile_check(objective, batch, generator)
        checks[name] = dict(syncs=sum(syncs.values()), sync_ops=dict(syncs), compiles_fullgraph=compiled,
                            compile_s=detail if compiled else None, compile_error=None if compiled else detail,
                            sync_debug=sync_debug_step(objective, model, batch, generator, device))
    return checks


def random_jpegs(folder, count, seed):
    """`count` smooth random JPEGs of SOURCE_IMAGE_SIZE in `folder` -> their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 4, 3), dtype=np.uint8)  # blocks of colour, JPEG-friendly
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(coarse).resize(SOURCE_IMAGE_SIZE[::-1], Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def bench_pipeline(config, tokenizer, args, device):
    """Pre-training samples per second through the DataLoader for each worker count: JPEG decode, resize, flip,
    RandAugment, the erasing draw (erasing p 0.6), uint8 out; caption tokenised and masked; one prompt masking per
    batch (as pretrain.py builds it). The first batch (workers' start-up) is not timed. dict workers -> samples/s."""
    batch_size = args.batch_pretrain
    count = batch_size * (args.pipeline_batches + 1)
    words = tokenizer.vocab[len(SPECIAL_TOKENS):]
    rng = random.Random(args.seed)
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        entries = [dict(image=path, caption=" ".join(rng.choices(words, k=rng.randint(*CAPTION_WORDS))), pid=i,
                        label=[rng.choice((-1, 0, 1)) for _ in range(len(MALS_PROMPTS) // 2)])
                   for i, path in enumerate(random_jpegs(folder, count, args.seed))]
        dataset = PretrainDataset(entries, train_transform(config.image_size, NORMALIZATION["mals"], 0.6), tokenizer,
                                  config.max_tokens, seed=args.seed,
                                  prompt_masking=PromptMasking(tokenizer, MALS_PROMPTS, config.max_tokens))
        for workers in args.pipeline_workers:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                                 pin_memory=device.type == "cuda")
            batches = iter(loader)
            next(batches)
            start, samples = time.perf_counter(), 0
            for batch in batches:
                samples += len(batch["pid"])
            rates[workers] = samples / (time.perf_counter() - start)
    return rates


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def random_testset(folder, tokenizer, num_queries, num_images, num_identities, seed):
    """A TestSet of smooth random JPEGs (SOURCE_IMAGE_SIZE) and random-word captions, two captions per image as
    in CUHK-PEDES, every query with at least one gallery match."""
    rng = np.random.default_rng(seed)
    words = tokenizer.vocab[len(SPECIAL_TOKENS):]
    image_paths = random_jpegs(folder, num_images, seed)
    g_pids = [i % num_identities for i in range(num_images)]
    low, high = CAPTION_WORDS
    captions = [" ".join(random.Random(seed + q).choices(words, k=int(rng.integers(low, high + 1))))
                for q in range(num_queries)]
    q_pids = [g_pids[(q // 2) % num_images] for q in range(num_queries)]
    return TestSet(image_paths=image_paths, g_pids=g_pids, captions=captions, q_pids=q_pids)


def bench_evaluation(model, tokenizer, args, device):
    """evaluate.evaluate_retrieval on a random CUHK-sized test set: dict with time_features/itm/total."""
    identities = CUHK_TEST["identities"] if not args.smoke else SMOKE_TEST["identities"]
    with tempfile.TemporaryDirectory() as folder:
        testset = random_testset(folder, tokenizer, args.eval_queries, args.eval_images,
                                 min(identities, args.eval_images), args.seed)
        kwargs = dict(normalization=NORMALIZATION["cuhk"], k_rerank=args.k_rerank,
                      batch_size=args.eval_batch_size, pair_batch=args.eval_pair_batch,
                      num_workers=args.eval_workers, progress=False)
        warm = TestSet(testset.image_paths[:8], testset.g_pids[:8], testset.captions[:16], testset.q_pids[:16])
        evaluate_retrieval(model, tokenizer, warm, device, **{**kwargs, "k_rerank": min(args.k_rerank, 8)})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = evaluate_retrieval(model, tokenizer, testset, device, **kwargs)
    result.update(queries=args.eval_queries, images=args.eval_images, k_rerank=args.k_rerank,
                  peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
    return result


# ----------------------------------------------------------------------------------------------------------------


def device_peak(device):
    """(name, dense bf16 peak in TFLOP/s or None)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def print_table(training, evaluation, device_name, peak_tflops, pipeline, checks):
    print(f"device: {device_name}; MFU against a dense bf16 peak of "
          f"{fmt(peak_tflops, '.0f') + ' TFLOP/s' if peak_tflops else 'n/a (unknown device)'}; x official: pairs/s "
          f"over the official code's TF32 on one H200 (fine-tuning {OFFICIAL_PAIRS_PER_S['finetune']:.0f} @120, "
          f"pre-training {OFFICIAL_PAIRS_PER_S['pretrain']:.0f} @150), goal {SPEED_GOAL:.1f}x")
    header = ("objective", "mode", "batch", "ms/step", "pairs/s", "x official", "peak GB", "TFLOP/step", "TFLOP/s",
              "MFU")
    rows = [(name, mode, r["batch_size"], r["error"], "", "", "", "", "", "") if "error" in r else
            (name, mode, r["batch_size"], fmt(r["ms_per_step"], ".1f"), fmt(r["pairs_per_s"], ".1f"),
             f"{r['pairs_per_s'] / OFFICIAL_PAIRS_PER_S[name]:.3g}x",
             fmt(r["peak_memory_gb"], ".2f"), fmt(r["tflops_per_step"], ".3g"), fmt(r["achieved_tflops"], ".3g"),
             "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%")
            for name, modes in training.items() for mode, r in modes.items()]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    for name, c in checks.items():
        compiled = f"compiles whole in {c['compile_s']:.1f} s" if c["compiles_fullgraph"] else \
            f"does not compile whole ({c['compile_error']})"
        print(f"{name} step: {c['syncs']} sync-forcing ops{' ' + str(c['sync_ops']) if c['syncs'] else ''}; "
              f"objective.losses {compiled} "
              f"(fullgraph, eager backend); sync-debug step: {c['sync_debug'] or 'n/a (CPU)'}")
    if pipeline:
        goal = SPEED_GOAL * max(OFFICIAL_PAIRS_PER_S.values())
        print("input pipeline (pre-training samples/s): " + ", ".join(
            f"{w} workers {rate:.0f}" + (f" ({rate / w:.0f} per worker)" if w else "") for w, rate in pipeline.items()))
        per_worker = [rate / w for w, rate in pipeline.items() if w]
        if per_worker:
            print(f"  -> {math.ceil(goal / min(per_worker))} workers would feed the fine-tuning goal of {goal:.0f} "
                  f"pairs/s at the slowest per-worker rate measured here")
    if evaluation:
        e = evaluation
        print(f"evaluation: {e['queries']} queries x {e['images']} images, top-{e['k_rerank']} re-rank: "
              f"features {e['time_features']:.2f} s, ITM {e['time_itm']:.2f} s, total {e['time_total']:.2f} s, "
              f"peak memory {fmt(e['peak_memory_gb'], '.2f')} GB")


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = CONFIGS[args.preset]
    tokenizer = bench_tokenizer(BERT_VOCAB_SIZE if args.preset == "aptm-base" else TINY_VOCAB_SIZE)
    config = replace(config, vocab_size=tokenizer.vocab_size)
    model = APTM(config).to(device)
    device_name, peak_tflops = device_peak(device)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
          f"{tokenizer.vocab_size:,}, {args.steps} timed steps after {args.warmup} warm-up, on {device_name}")
    model.checkpointing = args.checkpointing
    training = {name: bench_training(name, model, tokenizer, args, device, peak_tflops) for name in args.objectives}
    set_precision("fp32", device)
    checks = {} if args.no_checks else step_checks(model, tokenizer, args, device)
    pipeline = bench_pipeline(config, tokenizer, args, device) if args.pipeline_workers else {}
    evaluation = None if args.no_eval else bench_evaluation(model, tokenizer, args, device)
    print_table(training, evaluation, device_name, peak_tflops, pipeline, checks)
    result = dict(preset=args.preset, device=device_name, peak_bf16_tflops=peak_tflops, torch=torch.__version__,
                  steps=args.steps, warmup=args.warmup, adam=args.adam, checkpointing=args.checkpointing,
                  training=training, checks=checks, pipeline=pipeline, evaluation=evaluation)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
