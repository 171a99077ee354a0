"""APTM pre-training on MALS-format data: ITC + ITM + MLM + β·mean(IAC, IAM, MAM) (spec §2.9, E9).

    python pretrain.py                                   # tiny preset on the built-in synthetic world (CPU: minutes)
    python pretrain.py --preset aptm-base --ann 'data/gene_attrs/*.json' --image-root images/MALS \\
        --bert data/bert-base-uncased --swin data/swin_base_patch4_window7_224_22k.pth   # the paper's run
    torchrun --nproc_per_node 4 pretrain.py --preset aptm-base ...                      # several GPUs (DDP)
    python pretrain.py --resume out/pretrain/ckpt.pt                                     # continue a killed run exactly

Read top to bottom: the settings, the training plumbing that finetune.py imports too (distributed set-up, the
feature gather for ITC, the epoch sampler, the schedule `get_lr`, the optimizer, RNG states and checkpoints), the
objective E9 on one batch, and main() with the training loop written out.

Shapes: B batch, L text tokens, N image tokens, Dv/Dt vision/text widths, D projection width.
"""
import argparse
import json
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from attributes import MALS_PROMPTS, PromptStream, attribute_draws
from data import (NORMALIZATION, Loader, PretrainDataset, PromptMasking, Tokenizer, default_workers, device_images,
                  fail, load_retrieval, read_checkpoint, read_mals, train_transform)
from evaluate import evaluate_retrieval
from losses import (APL_WEIGHT, categorical_noise, itc_loss, itm_loss, mlm_loss, pretrain_objective,
                    sample_hard_negatives)
from model import (ADAMW_BETAS, ADAMW_EPS, APTM, CONFIGS, amp_dtype, config_for_bert, load_bert, load_swin,
                   optimizer_groups, take_kv)
from synthetic import synthetic_world

# Everything that differs between the CPU default and the paper (spec §5.4), beside the model sizes in
# model.CONFIGS; None on the command line means "take the preset's value".
PRESET_DEFAULTS = {
    "tiny": dict(epochs=4, batch_size=48, warmup_steps=50, lr=1e-3, erasing_p=0.0, randaugment=0, k_rerank=32,
                 eval_batch_size=128, uniform_negatives=1.0, label_smoothing=0.0),
    "aptm-base": dict(epochs=32, batch_size=150, warmup_steps=2600, lr=1e-4, erasing_p=0.6, randaugment=2,
                      k_rerank=128, eval_batch_size=150, uniform_negatives=0.0, label_smoothing=0.4),
}


UNIFORM_NEGATIVES_HELP = ("fraction of the run, from its start, in which ITM draws its negatives uniformly instead of "
                          "by ITC similarity (losses.sample_hard_negatives); paper 0; tiny (from scratch) 1")


RANDAUGMENT_HELP = ("RandAugment ops per training image at magnitude 7; paper 2 (spec §4.6); tiny 0: on its small "
                    "images its shears, rotations and equalisation cost the tiny model more than they teach")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--ann", nargs="+", help="MALS *_attrs.json files or globs (default: the synthetic world)")
    parser.add_argument("--image-root", help="folder the 'image' paths of --ann are relative to")
    parser.add_argument("--val-dataset", default="synthetic", choices=["synthetic", "cuhk", "rstp", "none"],
                        help="zero-shot retrieval monitored each epoch on its val split (official: CUHK test, spec §5.3)")
    parser.add_argument("--val-root", help="data root of --val-dataset (real datasets)")
    parser.add_argument("--data-dir", default="data/synthetic",
                        help="the synthetic world: used as it is if there, made with the defaults if not")
    # model
    parser.add_argument("--preset", default="tiny", choices=sorted(CONFIGS), help="model size (model.py)")
    parser.add_argument("--bert", help="BERT folder (e.g. bert-base-uncased): text widths, weights and vocabulary "
                        "(spec §1.3)")
    parser.add_argument("--text-layers", type=int, help="with --bert: its first N layers are the text encoder, the "
                        "rest the fusion layers; default half (paper 6 of 12)")
    parser.add_argument("--swin", help="swin_base_patch4_window7_224_22k.pth or a transformers SwinModel folder "
                        "(spec §1.2)")
    # optimisation (spec §5)
    parser.add_argument("--epochs", type=int, help="paper 32; tiny 4 (2,000 steps over 24,000 synthetic images)")
    parser.add_argument("--batch-size", type=int, help="per process; paper 150 on each of 4 GPUs; tiny 48")
    parser.add_argument("--lr", type=float, help="AdamW lr; paper 1e-4 (spec §5.1); tiny (from scratch) 1e-3")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="spec §5.1")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up W, in steps; paper 2600 (spec §5.2); tiny 50")
    parser.add_argument("--beta", type=float, default=APL_WEIGHT,
                        help="weight of the attribute stream, E9 (config key 't', losses.APL_WEIGHT)")
    parser.add_argument("--label-smoothing", type=float, help="ε of E7 on IAC and IAM; paper 0.4 (spec §2.8); tiny "
                        "(from scratch) 0: with targets 0.8/0.2 its IAC and IAM stay at their class priors")
    parser.add_argument("--uniform-negatives", type=float, help=UNIFORM_NEGATIVES_HELP)
    parser.add_argument("--k-rerank", type=int, help="validation: ITM re-ranks ITC's top k; paper 128, tiny 32")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm; 0 = none (official: none)")
    parser.add_argument("--erasing-p", type=float, help="random-erasing probability; paper 0.6 (spec §4.6); tiny 0, "
                        "whose small images lose the clothes it must learn")
    parser.add_argument("--randaugment", type=int, help=RANDAUGMENT_HELP)
    # system
    parser.add_argument("--out-dir", default="out/pretrain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 autocast where the GPU supports it, else fp16 + GradScaler; fp32 on CPU")
    parser.add_argument("--workers", type=int, help="data-loader processes (decode, augment, mask; and the "
                        "validation's images); default 6 on a GPU, 0 on a CPU (data.default_workers)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every Swin block "
                        "and text/fusion layer: same gradients, less memory, ~1/3 more compute (our choice; off)")
    parser.add_argument("--seed", type=int, default=42, help="official: 42 + rank")
    parser.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests); the schedule keeps "
                        "its full length")
    parser.add_argument("--resume", help="checkpoint to continue from, with its saved settings")
    args = parser.parse_args(argv)
    return fill_preset_defaults(args, parser, PRESET_DEFAULTS[args.preset])


def fill_preset_defaults(args, parser, preset):
    """Take the settings the user did not give from the preset's row (the loader processes from the device), and
    check the numbers."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = default_workers(args.device)
    rules = (  # (settings, test, what each must be); `not v >= 0` also refuses a nan
        (("epochs", "batch_size", "eval_batch_size", "k_rerank", "log_every", "max_steps"), lambda v: v >= 1,
         "at least 1"),
        (("lr", "weight_decay", "warmup_steps", "beta", "eda_weight", "grad_clip", "randaugment", "workers"),
         lambda v: v >= 0, "at least 0"),
        (("uniform_negatives", "erasing_p"), lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
        (("label_smoothing",), lambda v: 0 <= v < 1, "ε in [0, 1) (spec §2.8)"),
    )
    for keys, ok, what in rules:
        for key in keys:
            value = getattr(args, key, None)
            if value is not None and not ok(value):
                parser.error(f"--{key.replace('_', '-')} must be {what}")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2: ITM needs an in-batch negative (spec §2.3)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Plumbing shared with finetune.py: settings on --resume, distributed set-up, precision, the ITC gather, the epoch
# sampler, the schedule, the optimizer, RNG states, checkpoints. Each has a trap in it, so it is written once.


def resume_settings(args, script):
    """(args, checkpoint): without --resume, the command's settings and None; with it, the run's saved settings
    (all but --max-steps and --resume, which come from the command; a setting newer than the checkpoint keeps the
    command's value) and the checkpoint to continue from, which `script` ("pretrain" or "finetune") must have
    written."""
    if not args.resume:
        return args, None
    checkpoint = read_checkpoint(args.resume)
    if "args" not in checkpoint or "optimizer" not in checkpoint:
        fail(f"{args.resume}: no training state to resume (an official or weights-only checkpoint?); "
             "fine-tune from its weights with finetune.py --init")
    writer = "finetune" if "init" in checkpoint["args"] else "pretrain"  # only finetune.py has --init
    if writer != script:
        fail(f"{args.resume} is a {writer}.py checkpoint: resume it with {writer}.py"
             + (", or fine-tune from its weights with --init" if script == "finetune" else ""))
    saved = {**vars(args), **checkpoint["args"], "max_steps": args.max_steps, "resume": args.resume}
    return argparse.Namespace(**saved), checkpoint


def setup_distributed(device_name):
    """Return (rank, world_size, device). Under torchrun (RANK set) join the process group: NCCL on GPUs, gloo on
    CPUs. A single process makes no distributed calls at all."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_name)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device_name.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return rank, world_size, torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return rank, world_size, torch.device("cpu")


def cleanup_distributed():
    """Leave the process group. Call it after dropping the DDP wrapper, whose reducer holds the group. gloo frees a
    finished collective's tensors on its own threads, which need the GIL for that; destroying the group while one
    of them waits for the GIL deadlocks (seen in 2 of 8 two-process CPU runs). So: a barrier, then a moment with
    the GIL released, then the destroy."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


def seed_everything(seed):
    """The global torch, numpy and Python generators (official: 42 + rank, spec §5.3); rng_state saves all three."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def autocast_setup(device, dtype_name):
    """(autocast context, dtype, GradScaler): --dtype auto is model.amp_dtype (bf16 where supported, else fp16)
    on a GPU and fp32 on a CPU; the scaler is on for fp16 only, so one update path serves every precision."""
    dtype = getattr(torch, dtype_name) if dtype_name != "auto" else amp_dtype(device) or torch.float32
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    return ctx, dtype, scaler


class GatherWithGrad(torch.autograd.Function):
    """All-gather along the batch axis whose backward sums every rank's gradient and returns this rank's slice.
    Every rank computes the same loss over the gathered batch, so after DDP averages the parameter gradients
    over the W ranks they equal those of one process holding the whole batch. (The official AllGather returns
    only the local slice, which scales ITC's gradient by 1/W under DDP; our choice, see README.)"""

    @staticmethod
    def forward(ctx, x):                                                              # (B, ...)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)                                                       # (W·B, ...)

    @staticmethod
    def backward(ctx, grad):                                                          # (W·B, ...)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        share = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * share:(dist.get_rank() + 1) * share]           # (B, ...)


def gather(x):
    """Concatenate a tensor over all processes for ITC (spec §5.3: ITC uses the global batch); identity in a
    single process. Ranks hold equal batches (the sampler drops the rest)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    if x.is_floating_point():
        return GatherWithGrad.apply(x)
    with torch.no_grad():
        return GatherWithGrad.forward(None, x)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of one epoch, as a batch sampler: a permutation seeded by (seed, epoch), cut into this rank's share
    (drop_last, as the official loader), starting at `start` batches in so that a resumed run sees exactly the
    batches it would have seen."""

    def __init__(self, num_samples, batch_size, seed, epoch, rank=0, world_size=1, start=0):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(num_samples, generator=generator).tolist()
        per_rank = num_samples // (batch_size * world_size) * batch_size
        mine = order[rank * per_rank:(rank + 1) * per_rank]
        self.batches = [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)][start:]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class RunBatches(torch.utils.data.Sampler):
    """The batch sampler of a DataLoader built once per run, so that its worker processes live through every
    epoch (persistent_workers) instead of starting again each epoch. set(epoch, start) before each epoch; it then
    yields that epoch's EpochBatches with every index as (epoch, index): set_epoch on the training process's
    dataset never reaches the workers' copies, so the epoch travels with the indices (_SampleRandom.__getitems__)."""

    def __init__(self, num_samples, batch_size, seed, rank=0, world_size=1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.set(0)

    def set(self, epoch, start=0):
        self.epoch = epoch
        self.batches = EpochBatches(self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world_size,
                                    start)

    def __iter__(self):
        return ([(self.epoch, index) for index in batch] for batch in self.batches)

    def __len__(self):
        return len(self.batches)


PREFETCH_BATCHES = 4  # batches each worker keeps ready (DataLoader prefetch_factor; PyTorch's default 2; our choice)


def run_loader(dataset, batch_size, seed, rank, world_size, workers, device):
    """(loader, sampler) for the whole run: persistent workers that prefetch, pinned memory on a GPU. Call
    sampler.set(epoch, start) before iterating the loader for an epoch."""
    sampler = RunBatches(len(dataset), batch_size, seed, rank, world_size)
    loader = Loader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                    persistent_workers=workers > 0, prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
                    generator=torch.Generator())
    return loader, sampler


class NonFiniteWatch:
    """The stop on a non-finite loss (STYLE.md) without a host sync every step: update() remembers, on the
    device, the first step whose total is not finite and that step's terms; check(), at log steps and before a
    checkpoint, reads them back and stops the run naming them. A bad step is therefore reported up to
    --log-every steps later, and no checkpoint is written after it."""

    def __init__(self, device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values, self.names = None, None

    def update(self, step, terms):
        values = torch.stack([value.detach().float() for value in terms.values()])  # (T,)
        first = (self.step < 0) & ~torch.isfinite(terms["total"].detach())  # ()
        self.step = torch.where(first, step, self.step)
        self.values = values if self.values is None else torch.where(first, values, self.values)
        self.names = list(terms)

    def check(self):
        step = int(self.step)  # the one read-back
        if step >= 0:
            values = {name: round(value, 4) for name, value in zip(self.names, self.values.tolist())}
            fail(f"non-finite loss at step {step}: {values} (lower --lr, or try --dtype float32)")


class StopOnSignal:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM while training: the step in flight finishes, the checkpoint is
    written and the run stops with status 128 + the signal's number, to continue with --resume; a second signal
    acts at once, as it would have. One process reads the request after every step; under DDP the ranks agree on
    it at log steps (one all_reduce), so that all stop after the same step. Outside the main thread, where Python
    sets no handlers, it does nothing."""

    def __init__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored from the start (`cmd &`): stays so
                    self.previous[sig] = signal.signal(sig, self.note)

    def note(self, signum, frame):
        self.signal = signal.Signals(signum)
        self.restore()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, log_step, world_size, device):
        if world_size == 1:
            return self.signal is not None
        if not log_step:
            return False
        flag = torch.tensor(float(self.signal is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def exit(self, script, out_dir, master):
        """After the checkpoint: say how to continue, and stop with the signal's status."""
        if master:
            path = os.path.join(out_dir, "ckpt.pt")
            print(f"stopped by {self.signal.name if self.signal else 'a signal to another rank'}; continue with "
                  f"{script}.py --resume {path}")
        raise SystemExit(128 + int(self.signal or signal.SIGTERM))


def schedule_steps(num_samples, batch_size, world_size, epochs):
    """(steps per epoch, T). Each epoch runs ⌊N/(B·W)⌋ steps: the loader drops the last incomplete batch, as the
    official loader does (drop_last), so that every batch is whole on every rank (ITC gathers equal shares and ITM
    needs in-batch negatives). The schedule's length is T = epochs·⌈N/(B·W)⌉, as the official scheduler counts it
    (spec §5.2): when B·W does not divide N the lr ends just above 0 instead of at 0."""
    per_epoch = num_samples // (batch_size * world_size)
    if per_epoch == 0:
        fail(f"{num_samples} training samples cannot fill one batch of {batch_size} x {world_size} processes")
    return per_epoch, epochs * -(-num_samples // (batch_size * world_size))


def make_optimizer(model, lr, weight_decay, double_lr):
    """AdamW over the four groups of spec §5.1 (double_lr names the parameters trained at 2x lr: "cross" in
    pre-training, "finetune" in fine-tuning). Each group keeps its base lr, which get_lr(step) multiplies."""
    fused = next(model.parameters()).device.type == "cuda"  # one kernel for all parameters; foreach elsewhere
    optimizer = torch.optim.AdamW(optimizer_groups(model, weight_decay, lr, double_lr=double_lr), lr=lr,
                                  betas=ADAMW_BETAS, eps=ADAMW_EPS, fused=fused or None)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def get_lr(step, total_steps, warmup_steps, schedule):
    """λ(s) of spec §5.2, the factor on every group's own lr. s starts at 0, so the first step runs at lr 0.
    linear: s/W during warm-up, then (T−s)/(T−W). step: the same, times 1 / 0.5 / 0.2 from s = 0 / 4W / 7W."""
    if step < warmup_steps:
        return step / warmup_steps
    decay = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return decay
    return decay * (1.0 if step < 4 * warmup_steps else 0.5 if step < 7 * warmup_steps else 0.2)


def rng_state(generator):
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                 generator=generator.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, checkpoint):
    """torch.save to a temporary file, then rename: a run killed mid-write never leaves a broken checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def open_log(out_dir, start_step):
    """out_dir/log.jsonl, open for writing: the records up to `start_step` stay (a resumed run's checkpoint step;
    0 for a new run, whose log starts empty) and those a killed run wrote after its last checkpoint go, so that the
    log reads as one run."""
    path = os.path.join(out_dir, "log.jsonl")
    kept = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line.rstrip("\n") + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                    pass
    log_file = open(path, "w")
    log_file.writelines(kept)
    log_file.flush()
    return log_file


def all_rng_states(generator, world_size):
    """Every rank's RNG states, indexed by rank, for the checkpoint: a resumed DDP run then continues exactly.
    Under DDP this is a collective call that every rank makes."""
    state = rng_state(generator)
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore(checkpoint, optimizer, scaler, generator, rank):
    """Continue exactly where `checkpoint` stopped (the model is loaded by the caller): optimizer moments, loss
    scale and this rank's RNG states. Returns (step, best validation value so far)."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][min(rank, len(checkpoint["rng"]) - 1)], generator)
    return checkpoint["step"], checkpoint.get("best")


# ----------------------------------------------------------------------------------------------------------------
# The objective: E9 on one batch


def encode_batch_images(model, batch):
    """A training batch's images -> (image_embeds (B, N, Dv), image_feat (B, D), image_kv): normalised and erased on
    the device, encoded once, and each image's cross-attention keys/values projected once for all its pairs."""
    images = device_images(batch["image"], batch["erase"], batch["norm"])             # (B, 3, H, W)
    image_embeds = model.encode_image(images)                                         # (B, N, Dv)
    return image_embeds, model.image_feat(image_embeds), model.cross_kv(image_embeds)


def retrieval_losses(model, image_kv, image_feat, input_ids, attention_mask, pid, negatives, uniform=False):
    """ITC (E1, over the batch gathered from all processes) and ITM with in-batch hard negatives (E2), or uniform
    ones, for one batch of captions. image_kv: model.cross_kv of the batch's images (each image's keys/values
    projected once, then indexed for its pairs); negatives: the (2, B, B) categorical_noise of the draws (or a
    torch.Generator). Returns (itc, itm). finetune.py calls it for the caption and its EDA copy."""
    text_embeds = model.encode_text(input_ids, attention_mask)                        # (B, L, Dt)
    text_feat = model.text_feat(text_embeds)                                          # (B, D)
    loss_itc = itc_loss(gather(image_feat), gather(text_feat), gather(pid), model.temp)
    # Hard negatives are drawn within the local batch (spec §2.3): for each text an image, for each image a text.
    neg_image, neg_text = sample_hard_negatives(image_feat, text_feat, pid, model.temp, negatives, uniform)  # (B,)
    # 3B pairs: (I_b, T_b) label 1, (Ĩ_b, T_b) label 0, (I_b, T̃_b) label 0.
    pair_text = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]])          # (3B, L, Dt)
    pair_atts = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])  # (3B, L)
    own = torch.arange(pid.shape[0], device=pid.device)                               # (B,)
    pair_image = torch.cat([own, neg_image, own])                                     # (3B,)
    labels = torch.cat([torch.ones_like(pid), torch.zeros_like(pid), torch.zeros_like(pid)])  # (3B,)
    loss_itm = itm_loss(model.itm_logits(pair_text, pair_atts, image_kv=take_kv(image_kv, pair_image)), labels)
    return loss_itc, loss_itm


class PretrainObjective(torch.nn.Module):
    """E9 on one batch: L = L_itc + L_itm + L_mlm + β·(L_iac + L_iam + L_mam)/3 (spec §2.9). A module, so that DDP
    sees the whole forward."""

    def __init__(self, model, tokenizer, prompts, beta, label_smoothing, max_tokens, uniform_negatives):
        super().__init__()
        self.model, self.beta, self.uniform_negatives = model, beta, uniform_negatives
        self.prompts = PromptStream(tokenizer, prompts, max_tokens, label_smoothing)

    def forward(self, batch, generator, progress):
        """batch from PretrainDataset; progress = step / T in [0, 1) -> dict of named loss terms with "total"."""
        return self.losses(batch, *self.draw(batch, generator, progress))

    def draw(self, batch, generator, progress):
        """The step's random numbers and choices -> the arguments of `losses` after the batch. Drawn first, in
        eager mode (torch.compile cannot trace an op that takes a Generator), so that `losses` compiles whole."""
        batch_size = batch["pid"].shape[0]
        draws = dict(negatives=categorical_noise((2, batch_size, batch_size), generator),
                     attributes=attribute_draws(batch["attr_label"], generator))
        return draws, progress < self.uniform_negatives

    def losses(self, batch, draws, uniform):
        model = self.model
        image_embeds, image_feat, image_kv = encode_batch_images(model, batch)
        loss_itc, loss_itm = retrieval_losses(model, image_kv, image_feat, batch["input_ids"],
                                              batch["attention_mask"], batch["pid"], draws["negatives"], uniform)
        # MLM on the caption, conditioned on the image (E3); the masks were drawn in the data-loader workers.
        mlm_logits = model.mlm_logits(batch["masked_ids"], batch["attention_mask"], None, batch["masked_pos"],
                                      image_kv=image_kv)                              # (B, M, V)
        loss_mlm = mlm_loss(mlm_logits, batch["masked_labels"])
        # The attribute-prompt stream: IAC, IAM, MAM (E4-E6) over the MALS prompts.
        attr = self.prompts(model, image_embeds, image_feat, batch, draws["attributes"], image_kv)
        return pretrain_objective(loss_itc, loss_itm, loss_mlm, attr["iac"], attr["iam"], attr["mam"], self.beta)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args, resume = resume_settings(get_args(argv), "pretrain")
    rank, world_size, device = setup_distributed(args.device)
    master = rank == 0
    seed_everything(args.seed + rank)
    os.makedirs(args.out_dir, exist_ok=True)

    # data: MALS files, or the synthetic world's (read_mals checks that every image exists)
    if args.ann:
        entries = read_mals(args.ann, args.image_root or ".")
    else:
        world = synthetic_world(args.data_dir)
        entries = read_mals(world["mals_ann"], world["mals_root"])
    # tokenizer: the checkpoint's, the --bert folder's, or one built offline from the texts (spec §1.3)
    if resume is not None:
        tokenizer = Tokenizer.from_state(resume["tokenizer"])
    elif args.bert:
        tokenizer = Tokenizer.from_bert_dir(args.bert)
    else:
        tokenizer = Tokenizer.from_corpus([e["caption"] for e in entries] + list(MALS_PROMPTS))
    # model: the preset's size (the text side --bert's) with the tokenizer's vocabulary; BERT and Swin weights when
    # given (spec §1.2, §1.3)
    config = config_for_bert(CONFIGS[args.preset], args.bert, args.text_layers) if args.bert else CONFIGS[args.preset]
    model = APTM(replace(config, vocab_size=tokenizer.vocab_size))
    if args.bert:
        load_bert(model, args.bert)
    if args.swin:
        load_swin(model, args.swin)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model = model.to(device)
    model.checkpointing = args.checkpointing  # activations recomputed in the backward
    config = model.config
    dataset = PretrainDataset(entries, train_transform(config.image_size, NORMALIZATION["mals"], args.erasing_p,
                                                       args.randaugment),
                              tokenizer, config.max_tokens, seed=args.seed,
                              prompt_masking=PromptMasking(tokenizer, MALS_PROMPTS, config.max_tokens))
    objective = PretrainObjective(model, tokenizer, MALS_PROMPTS, args.beta, args.label_smoothing,
                                  config.max_tokens, args.uniform_negatives).to(device)
    # zero-shot retrieval on a validation split, monitored each epoch (the official run watches CUHK test, §5.3)
    valset = None
    if args.val_dataset != "none":
        val_root = args.val_root or (synthetic_world(args.data_dir)["cuhk_raw"] if args.val_dataset == "synthetic"
                                     else None)
        valset = load_retrieval(args.val_dataset, val_root, "val")

    # optimisation: AdamW with the 2x lr set of pre-training (spec §5.1), linear schedule with W warm-up steps (§5.2)
    ctx, dtype, scaler = autocast_setup(device, args.dtype)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, double_lr="cross")
    generator = torch.Generator(device).manual_seed(args.seed + rank)  # hard negatives, IAM prompts, MAM images
    per_epoch, total_steps = schedule_steps(len(dataset), args.batch_size, world_size, args.epochs)
    step, best = restore(resume, optimizer, scaler, generator, rank) if resume is not None else (0, None)
    last_step = args.epochs * per_epoch if args.max_steps is None else min(args.epochs * per_epoch, args.max_steps)
    wrapped = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else objective
    log_file = open_log(args.out_dir, step) if master else None
    if master:
        print(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {world_size} x {device} "
              f"({dtype}), {len(dataset):,} samples, {per_epoch} steps/epoch x {args.epochs} epochs")
    t0 = t_log = time.time()
    pairs_since_log = 0
    # one loader for the whole run: its workers persist across epochs and prefetch (run_loader)
    loader, sampler = run_loader(dataset, args.batch_size, args.seed, rank, world_size, args.workers, device)
    watch = NonFiniteWatch(device)
    stop, stopping = StopOnSignal(), False  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
    while step < last_step and not stopping:
        # one epoch's batches, from where a resumed run stopped; each sample's augmentation is seeded by
        # (seed, epoch, index), so it is the same with any number of workers
        epoch, start = divmod(step, per_epoch)
        sampler.set(epoch, start)
        model.train()
        for batch in tqdm(loader, total=len(sampler), desc=f"epoch {epoch}", disable=not master, leave=False,
                          dynamic_ncols=True):
            # ---------------- TRAINING STEP BEGIN ----------------
            # lr: every group's base lr times λ(step) (spec §5.2)
            lr_factor = get_lr(step, total_steps, args.warmup_steps, "linear")
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # forward under autocast: every loss term of E9
            with ctx:
                terms = wrapped(batch, generator, step / total_steps)
            # a non-finite loss is noted on the device and read back at log steps (no host sync per step)
            watch.update(step, terms)
            # backward through the scaler (a no-op unless fp16), unscale, clip, step
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["total"]).backward()
            scaler.unscale_(optimizer)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            # ---------------- TRAINING STEP END ----------------
            # log: every term, the lr and the throughput, on screen and in log.jsonl
            pairs_since_log += len(batch["image"]) * world_size
            log_step = step % args.log_every == 0 or step == last_step
            if log_step:
                watch.check()  # every rank: stop, naming the first step with a non-finite loss and its terms
            if master and log_step:
                record = dict(step=step, epoch=epoch, lr=args.lr * lr_factor,
                              **{k: round(v.item(), 4) for k, v in terms.items()},
                              pairs_per_s=round(pairs_since_log / (time.time() - t_log), 1))
                tqdm.write(" | ".join(f"{k} {v}" for k, v in record.items()))
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                t_log, pairs_since_log = time.time(), 0
            stopping = stop.requested(log_step, world_size, device)
            if step == last_step or stopping:
                break
        # evaluate: zero-shot retrieval on the validation split after each whole epoch; the best R1 is kept
        watch.check()  # no evaluation or checkpoint of weights that a non-finite loss has reached
        epoch_done, is_best = step % per_epoch == 0, False
        if epoch_done and master and valset is not None:
            metrics = evaluate_retrieval(model, tokenizer, valset, device, k_rerank=args.k_rerank,
                                         normalization=NORMALIZATION[args.val_dataset],
                                         batch_size=args.eval_batch_size, num_workers=args.workers)
            metrics = {f"val_{k}": metrics[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}
            is_best = best is None or metrics["val_R1"] > best
            best = metrics["val_R1"] if is_best else best
            tqdm.write(f"epoch {epoch} | " + " | ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            log_file.write(json.dumps(dict(step=step, epoch=epoch, **metrics)) + "\n")
            log_file.flush()
        # checkpoint: after each epoch, at --max-steps and on a stop signal; best.pt for the best epoch, with its R1
        if world_size > 1:
            dist.barrier()
        rng = all_rng_states(generator, world_size)
        if master:
            checkpoint = dict(model=model.state_dict(), config=asdict(config), tokenizer=tokenizer.state(),
                              args=vars(args), step=step, best=best, optimizer=optimizer.state_dict(),
                              scaler=scaler.state_dict(), rng=rng)
            save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), checkpoint)
            if is_best:
                save_checkpoint(os.path.join(args.out_dir, "best.pt"), checkpoint)
    stop.restore()
    if master:
        log_file.close()
        print(f"done in {time.time() - t0:.0f} s; checkpoint: {os.path.join(args.out_dir, 'ckpt.pt')}")
    del wrapped  # before the process group goes (cleanup_distributed)
    cleanup_distributed()
    if stopping:
        stop.exit("pretrain", args.out_dir, master)


if __name__ == "__main__":
    main()
