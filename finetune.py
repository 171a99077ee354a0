"""APTM fine-tuning: text-based person retrieval (E10-E12) and attribute recognition (E13) (spec §2.9).

Retrieval: (L_itc + 0.8·L_itc^eda) + (L_itm + 0.8·L_itm^eda) + L_mlm on CUHK-PEDES, ICFG-PEDES, RSTPReid or the
synthetic world. Attribute recognition: L_iac + L_iam + L_mam over the 26 PA-100K prompts (--dataset pa100k) or the
27 MALS prompts on the synthetic world's attribute split (--dataset synthetic-attr).

    python finetune.py --init out/pretrain/ckpt.pt                  # synthetic world, from our pre-training
    python finetune.py                                              # synthetic world, from random weights
    python finetune.py --dataset cuhk --data-root data/CUHK-PEDES --init checkpoint_31.pth \\
        --bert data/bert-base-uncased --preset aptm-base            # the paper's CUHK-PEDES run
    python finetune.py --dataset pa100k --data-root data/PA100K --init checkpoint_31.pth \\
        --bert data/bert-base-uncased --preset aptm-base            # the paper's PA-100K run (E13)
    python finetune.py --dataset synthetic-attr --init out/pretrain/ckpt.pt   # E13 on the synthetic world
    torchrun --nproc_per_node 4 finetune.py ...                     # several GPUs (DDP)
    python finetune.py --resume out/finetune/ckpt.pt                # continue a killed run exactly

The best epoch is chosen on the validation split (the official code chooses on test, spec §5.3): R1 for retrieval,
mA for PA-100K. ICFG-PEDES and the synthetic attribute split have no validation split, so there the last epoch is
kept. The test split is evaluated once, at the end. The training loop is written out in main(); the plumbing it
shares with pre-training (distributed set-up, ITC gather, epoch sampler, schedule, optimizer, RNG and checkpoint
helpers) and the ITC/ITM pair of E1/E2 are imported from pretrain.py.

Shapes: B batch, L text tokens, N image tokens, Dv/Dt vision/text widths, D projection width.
"""
import argparse
import json
import os
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from attributes import (ATTRIBUTE_DATASETS, PROMPT_MAX_TOKENS, PROMPT_TABLES, PromptStream, attribute_draws,
                        attribute_split, evaluate_attributes)
from data import (NORMALIZATION, AttributeDataset, FinetuneDataset, PromptMasking, Tokenizer, fail,
                  load_model_and_tokenizer, load_retrieval, read_checkpoint, read_mals, train_transform)
from evaluate import evaluate_retrieval
from losses import EDA_WEIGHT, categorical_noise, finetune_objective, mlm_loss, pa100k_objective
from model import APTM, CONFIGS, config_for_bert, load_bert
from pretrain import (RANDAUGMENT_HELP, UNIFORM_NEGATIVES_HELP, NonFiniteWatch, StopOnSignal, all_rng_states,
                      autocast_setup, cleanup_distributed, encode_batch_images, fill_preset_defaults, get_lr,
                      make_optimizer, open_log, restore, resume_settings, retrieval_losses, run_loader,
                      save_checkpoint, schedule_steps, seed_everything, setup_distributed)
from synthetic import synthetic_world

RETRIEVAL_DATASETS = ("synthetic", "cuhk", "icfg", "rstp")
FINETUNE_ATTRIBUTE_DATASETS = {"synthetic-attr": "synthetic", "pa100k": "pa100k"}  # → attributes.ATTRIBUTE_DATASETS

# Everything that differs between the CPU default and the paper (spec §5.4), beside the model sizes in
# model.CONFIGS; None on the command line means "take the preset's value". Retrieval (E10-E12):
PRESET_DEFAULTS = {
    "tiny": dict(epochs=10, batch_size=48, lr=1e-3, erasing_p=0.0, randaugment=0, k_rerank=32, eval_batch_size=128,
                 uniform_negatives=1.0, replay=6000),
    "aptm-base": dict(epochs=30, batch_size=120, lr=1e-4, erasing_p=0.6, randaugment=2, k_rerank=128,
                      eval_batch_size=150, uniform_negatives=0.0, replay=0),
}
# Attribute recognition (E13; spec §5.4 column pa100k):
ATTRIBUTE_PRESET_DEFAULTS = {
    "tiny": dict(epochs=5, batch_size=48, lr=1e-4, erasing_p=0.6, randaugment=2, eval_batch_size=128),
    "aptm-base": dict(epochs=30, batch_size=200, lr=1e-4, erasing_p=0.6, randaugment=2, eval_batch_size=200),
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--dataset", default="synthetic",
                        choices=[*RETRIEVAL_DATASETS, *FINETUNE_ATTRIBUTE_DATASETS],
                        help="retrieval: synthetic (the built-in world), cuhk, icfg, rstp; attribute recognition: "
                        "pa100k, synthetic-attr (the built-in world's attribute split, 27 MALS attributes)")
    parser.add_argument("--data-root", help="dataset folder (annotations + images; see README)")
    parser.add_argument("--data-dir", default="data/synthetic",
                        help="the synthetic world: used as it is if there, made with the defaults if not")
    # model
    parser.add_argument("--init", help="checkpoint to start from: ours, or a released APTM checkpoint")
    parser.add_argument("--preset", default="tiny", choices=sorted(CONFIGS),
                        help="run lengths and, without --init, the model size (with --init the model is the "
                        "checkpoint's)")
    parser.add_argument("--bert", help="BERT folder (vocabulary; widths and weights when there is no --init)")
    parser.add_argument("--text-layers", type=int, help="with --bert and no --init: its first N layers are the text "
                        "encoder, the rest the fusion layers; default half (paper 6 of 12)")
    # optimisation (spec §5)
    parser.add_argument("--epochs", type=int, help="paper 30; tiny 10 (retrieval), 5 (attributes)")
    parser.add_argument("--batch-size", type=int, help="per process; paper 120 (retrieval) and 200 (PA-100K) on "
                        "each of 4 GPUs; tiny 48")
    parser.add_argument("--lr", type=float, help="AdamW lr; paper 1e-4 (spec §5.1); tiny 1e-3 (retrieval)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="spec §5.1")
    parser.add_argument("--warmup-fraction", type=float, default=0.1,
                        help="warm-up as a fraction of all steps: W = ⌊fraction·T⌋ steps (spec §5.2)")
    parser.add_argument("--eda-weight", type=float, default=EDA_WEIGHT,
                        help="weight of the EDA copy in E10/E11 (losses.EDA_WEIGHT)")
    parser.add_argument("--uniform-negatives", type=float, help=UNIFORM_NEGATIVES_HELP)
    parser.add_argument("--replay", type=int, help="--dataset synthetic: mix the first N of the world's MALS-style "
                        "pre-training images (one caption each, each its own identity) into the training split; "
                        "ours, not the paper (which fine-tunes on the target split alone): the tiny model over-fits "
                        "the 2,400 training captions; paper 0, tiny 6000")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm; 0 = none (official: none)")
    parser.add_argument("--erasing-p", type=float, help="random-erasing probability; paper 0.6 (spec §4.6); tiny 0 "
                        "for retrieval")
    parser.add_argument("--randaugment", type=int, help=RANDAUGMENT_HELP)
    # evaluation (spec §6)
    parser.add_argument("--k-rerank", type=int, help="ITM re-ranks ITC's top k (k_test); paper 128, tiny 32")
    # system
    parser.add_argument("--out-dir", default="out/finetune")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--workers", type=int, help="data-loader processes (decode, augment, EDA, mask; and the "
                        "validation's and test's images); default 6 on a GPU, 0 on a CPU (data.default_workers)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every Swin block "
                        "and text/fusion layer: same gradients, less memory, ~1/3 more compute (our choice; off)")
    parser.add_argument("--seed", type=int, default=42, help="official: 42 + rank")
    parser.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    parser.add_argument("--resume", help="checkpoint to continue from, with its saved settings")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_fraction < 1:
        parser.error("--warmup-fraction is a fraction in [0, 1)")
    if args.dataset == "pa100k" and not args.data_root:
        parser.error("--dataset pa100k needs --data-root")
    if args.replay and args.dataset != "synthetic":
        parser.error("--replay mixes in the synthetic world's pre-training images: --dataset synthetic only")
    table = ATTRIBUTE_PRESET_DEFAULTS if args.dataset in FINETUNE_ATTRIBUTE_DATASETS else PRESET_DEFAULTS
    args = fill_preset_defaults(args, parser, table[args.preset])
    if args.dataset != "synthetic":
        args.replay = 0  # the preset's replay is for the synthetic world only (the attribute presets have none)
    if args.replay < 0:
        parser.error("--replay must be at least 0")
    return args


def replay_entries(entries, world, count):
    """The first `count` MALS-style pre-training images of the synthetic world as retrieval entries (image, caption,
    pid), each its own identity after the training split's, as in pre-training (spec §4.2: image_id unique)."""
    first = 1 + max(pid for _, _, pid in entries)
    mals = read_mals(world["mals_ann"], world["mals_root"])[:count]
    return [(entry["image"], entry["caption"], first + i) for i, entry in enumerate(mals)]


class FinetuneObjective(torch.nn.Module):
    """E10-E12 on one batch; the EDA copy of each caption shares its image and identity."""

    def __init__(self, model, eda_weight, uniform_negatives):
        super().__init__()
        self.model, self.eda_weight, self.uniform_negatives = model, eda_weight, uniform_negatives

    def forward(self, batch, generator, progress):
        """batch from FinetuneDataset; progress = step / T in [0, 1) -> dict of named loss terms with "total"."""
        return self.losses(batch, *self.draw(batch, generator, progress))

    def draw(self, batch, generator, progress):
        """The step's random numbers -> the arguments of `losses` after the batch. Drawn first, in eager mode
        (torch.compile cannot trace an op that takes a Generator), so that `losses` compiles whole."""
        batch_size = batch["pid"].shape[0]
        negatives = categorical_noise((2, 2, batch_size, batch_size), generator)  # caption, EDA copy
        return negatives, progress < self.uniform_negatives

    def losses(self, batch, negatives, uniform):
        model = self.model
        image_embeds, image_feat, image_kv = encode_batch_images(model, batch)
        pid = batch["pid"]
        loss_itc, loss_itm = retrieval_losses(model, image_kv, image_feat, batch["input_ids"],
                                              batch["attention_mask"], pid, negatives[0], uniform)
        loss_itc_eda, loss_itm_eda = retrieval_losses(model, image_kv, image_feat, batch["eda_input_ids"],
                                                      batch["eda_attention_mask"], pid, negatives[1], uniform)
        # MLM on the original caption only (E12).
        mlm_logits = model.mlm_logits(batch["masked_ids"], batch["attention_mask"], None, batch["masked_pos"],
                                      image_kv=image_kv)                              # (B, M, V)
        loss_mlm = mlm_loss(mlm_logits, batch["masked_labels"])
        return finetune_objective(loss_itc, loss_itc_eda, loss_itm, loss_itm_eda, loss_mlm, self.eda_weight)


class AttributeObjective(torch.nn.Module):
    """E13 on one batch: L = L_iac + L_iam + L_mam over a prompt table, no label smoothing (spec §2.9)."""

    def __init__(self, model, tokenizer, table):
        super().__init__()
        self.model = model
        self.prompts = PromptStream(tokenizer, PROMPT_TABLES[table], PROMPT_MAX_TOKENS[table], label_smoothing=0.0)

    def forward(self, batch, generator, progress):
        """batch from AttributeDataset (with its prompt masking) -> dict of named loss terms with "total"."""
        return self.losses(batch, *self.draw(batch, generator, progress))

    def draw(self, batch, generator, progress):
        """The step's random choices -> the arguments of `losses` after the batch (drawn first, in eager mode:
        torch.compile cannot trace an op that takes a Generator)."""
        return (attribute_draws(batch["attr_label"], generator),)

    def losses(self, batch, draws):
        image_embeds, image_feat, image_kv = encode_batch_images(self.model, batch)
        attr = self.prompts(self.model, image_embeds, image_feat, batch, draws, image_kv)
        return pa100k_objective(attr["iac"], attr["iam"], attr["mam"])


def evaluate_split(args, model, tokenizer, split_data, device):
    """Retrieval metrics (R1, R5, R10, mAP, mINP) of a TestSet, or attribute metrics (mA, Acc, Prec, Rec, F1 and
    our AUC) of a list of (image, labels), in percent."""
    if args.dataset in FINETUNE_ATTRIBUTE_DATASETS:
        table, norm = ATTRIBUTE_DATASETS[FINETUNE_ATTRIBUTE_DATASETS[args.dataset]]
        metrics, _ = evaluate_attributes(model, tokenizer, split_data, table, NORMALIZATION[norm],
                                         args.eval_batch_size, args.workers)
        return metrics
    metrics = evaluate_retrieval(model, tokenizer, split_data, device, k_rerank=args.k_rerank,
                                 normalization=NORMALIZATION[args.dataset], batch_size=args.eval_batch_size,
                                 num_workers=args.workers)
    return {k: metrics[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}


def main(argv=None):
    args, resume = resume_settings(get_args(argv), "finetune")
    rank, world_size, device = setup_distributed(args.device)
    master = rank == 0
    seed_everything(args.seed + rank)
    os.makedirs(args.out_dir, exist_ok=True)

    # data: the train split, the validation split that selects the best epoch (where the dataset has one) and the
    # test split; the readers check that every image exists
    if args.dataset in FINETUNE_ATTRIBUTE_DATASETS:
        source = FINETUNE_ATTRIBUTE_DATASETS[args.dataset]
        table, norm = ATTRIBUTE_DATASETS[source]
        data_root = args.data_dir if source == "synthetic" else args.data_root
        entries = attribute_split(source, data_root, "train")
        valset = attribute_split(source, data_root, "val") if source == "pa100k" else None
        selected = "mA"
        corpus = list(PROMPT_TABLES[table])
    else:
        norm = args.dataset
        world = synthetic_world(args.data_dir) if args.dataset == "synthetic" else None
        data_root = world["cuhk_raw"] if world else args.data_root
        if not data_root:
            fail(f"--dataset {args.dataset} needs --data-root (the dataset folder)")
        entries = load_retrieval(args.dataset, data_root, "train")
        if args.replay:  # the tiny preset: pre-training images mixed in (ours; --replay 0 is the paper)
            entries = entries + replay_entries(entries, world, args.replay)
        valset = load_retrieval(args.dataset, data_root, "val") if args.dataset != "icfg" else None
        selected = "R1"
        corpus = [entry[1] for entry in entries]
    # model and tokenizer: from --resume or --init (ours, or an official release whose vocabulary comes from
    # --bert), or new at the preset's size (+ the --bert folder's text side)
    if args.resume or args.init:
        model, tokenizer = load_model_and_tokenizer(args.resume or args.init, args.bert, torch.device("cpu"))
    else:
        tokenizer = Tokenizer.from_bert_dir(args.bert) if args.bert else Tokenizer.from_corpus(corpus)
        config = CONFIGS[args.preset]
        if args.bert:
            config = config_for_bert(config, args.bert, args.text_layers)
        model = APTM(replace(config, vocab_size=tokenizer.vocab_size))
        if args.bert:
            load_bert(model, args.bert)
    model = model.to(device)
    model.checkpointing = args.checkpointing  # activations recomputed in the backward
    config = model.config
    transform = train_transform(config.image_size, NORMALIZATION[norm], args.erasing_p, args.randaugment)
    if args.dataset in FINETUNE_ATTRIBUTE_DATASETS:
        dataset = AttributeDataset(entries, transform, args.seed,
                                   PromptMasking(tokenizer, PROMPT_TABLES[table], PROMPT_MAX_TOKENS[table]))
        objective = AttributeObjective(model, tokenizer, table).to(device)
    else:
        dataset = FinetuneDataset(entries, transform, tokenizer, config.max_tokens, seed=args.seed,
                                  clean_eda=args.dataset in ("icfg", "rstp"))
        objective = FinetuneObjective(model, args.eda_weight, args.uniform_negatives).to(device)

    # optimisation: AdamW with the 2x lr set of fine-tuning (spec §5.1), step schedule, W = ⌊fraction·T⌋ (§5.2)
    ctx, dtype, scaler = autocast_setup(device, args.dtype)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, double_lr="finetune")
    generator = torch.Generator(device).manual_seed(args.seed + rank)  # hard negatives, IAM prompts, MAM images
    per_epoch, total_steps = schedule_steps(len(dataset), args.batch_size, world_size, args.epochs)
    warmup_steps = int(args.warmup_fraction * total_steps)
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
            lr_factor = get_lr(step, total_steps, warmup_steps, "step")
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # forward under autocast: every loss term of E10-E12 or E13
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
        # evaluate: the validation split after each whole epoch; the best R1 (retrieval) or mA (attributes) is kept
        watch.check()  # no evaluation or checkpoint of weights that a non-finite loss has reached
        epoch_done, is_best = step % per_epoch == 0, False
        if epoch_done and master and valset is not None:
            metrics = {f"val_{k}": v for k, v in evaluate_split(args, model, tokenizer, valset, device).items()}
            is_best = best is None or metrics[f"val_{selected}"] > best
            best = metrics[f"val_{selected}"] if is_best else best
            tqdm.write(f"epoch {epoch} | " + " | ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            log_file.write(json.dumps(dict(step=step, epoch=epoch, **metrics)) + "\n")
            log_file.flush()
        # checkpoint: after each epoch, at --max-steps and on a stop signal; best.pt for the best epoch, with its value
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
    # test once, with the best epoch's weights (the last epoch's without a validation split, or when --max-steps
    # ended the run before an epoch did); not after a stop signal
    test = None
    if master and not stopping:
        minutes = (time.time() - t0) / 60
        chosen = os.path.join(args.out_dir, "best.pt")
        if best is None or not os.path.isfile(chosen):  # no validation in this run: a best.pt there is older
            chosen = os.path.join(args.out_dir, "ckpt.pt")
        model.load_state_dict(read_checkpoint(chosen)["model"])
        if args.dataset in FINETUNE_ATTRIBUTE_DATASETS:
            testset = attribute_split(source, data_root, "test")
        else:
            testset = load_retrieval(args.dataset, data_root, "test")
        test = evaluate_split(args, model, tokenizer, testset, device)
        print(f"done in {minutes:.1f} min; test with {chosen}: " + " | ".join(f"{k} {v:.2f}" for k, v in test.items()))
        with open(os.path.join(args.out_dir, "results.json"), "w") as f:
            json.dump(dict(checkpoint=chosen, test=test), f, indent=1)
    del wrapped  # before the process group goes (cleanup_distributed)
    cleanup_distributed()
    if stopping:
        stop.exit("finetune", args.out_dir, master)
    return test


if __name__ == "__main__":
    main()
