"""APTM retrieval fine-tuning: (L_itc + 0.8·L_itc^eda) + (L_itm + 0.8·L_itm^eda) + L_mlm (spec §2.9, E10-E12).

    python finetune.py --init out/pretrain/ckpt.pt                  # synthetic world, from our pre-training
    python finetune.py                                              # synthetic world, from random weights
    python finetune.py --dataset cuhk --data-root data/CUHK-PEDES --init checkpoint_31.pth \\
        --bert data/bert-base-uncased --preset aptm-base            # the paper's CUHK-PEDES run
    torchrun --nproc_per_node 4 finetune.py ...                     # several GPUs (DDP)

The best epoch is chosen on the validation split (the official code chooses on test, spec §5.3); ICFG-PEDES has no
validation split, so there the last epoch is kept. The test split is evaluated once, at the end, and both are
reported. The training loop and its plumbing live in pretrain.py.

Shapes: B batch, L text tokens, N image tokens, Dv/Dt vision/text widths, D projection width.
"""
import argparse
import json
import os
import time
from dataclasses import asdict

import torch

from data import (NORMALIZATION, FinetuneDataset, Tokenizer, check_images, device_images, fail, load_retrieval,
                  read_checkpoint, synthetic_world, train_transform)
from evaluate import evaluate_retrieval, load_model_and_tokenizer
from losses import categorical_noise, finetune_objective, mlm_loss
from model import APTM, CONFIGS, load_bert
from pretrain import (DEFAULT_WORKERS, UNIFORM_NEGATIVES_HELP, cleanup_distributed, fill_preset_defaults, init_run,
                      retrieval_losses, retrieval_monitor, train)

PRESET_DEFAULTS = {
    "tiny": dict(epochs=10, batch_size=48, lr=1e-3, erasing_p=0.0, k_rerank=32, eval_batch_size=128,
                 uniform_negatives=1.0),
    "aptm-base": dict(epochs=30, batch_size=120, lr=1e-4, erasing_p=0.6, k_rerank=128, eval_batch_size=150,
                      uniform_negatives=0.0),
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "cuhk", "icfg", "rstp"])
    parser.add_argument("--data-root", help="dataset folder (annotations + images; see README)")
    parser.add_argument("--data-dir", default="data/synthetic",
                        help="the synthetic world: used as it is if there, made with the defaults if not")
    # model
    parser.add_argument("--init", help="checkpoint to start from: ours, or a released APTM checkpoint")
    parser.add_argument("--preset", default="tiny", choices=sorted(CONFIGS),
                        help="run lengths and, without --init, the model size (with --init the model is the "
                        "checkpoint's)")
    parser.add_argument("--bert", help="bert-base-uncased folder (vocabulary; weights when there is no --init)")
    # optimisation (spec §5)
    parser.add_argument("--epochs", type=int, help="paper 30; tiny 10")
    parser.add_argument("--batch-size", type=int, help="per process; paper 120 on each of 4 GPUs; tiny 48")
    parser.add_argument("--lr", type=float, help="AdamW lr; paper 1e-4 (spec §5.1); tiny 1e-3")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="spec §5.1")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up, fraction of all steps (spec §5.2)")
    parser.add_argument("--eda-weight", type=float, default=0.8, help="weight of the EDA copy in E10/E11")
    parser.add_argument("--uniform-negatives", type=float, help=UNIFORM_NEGATIVES_HELP)
    parser.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm; 0 = none (official: none)")
    parser.add_argument("--erasing-p", type=float, help="random-erasing probability; paper 0.6 (spec §4.6); tiny 0")
    # evaluation (spec §6)
    parser.add_argument("--k-rerank", type=int, help="ITM re-ranks ITC's top k (k_test); paper 128, tiny 32")
    # system
    parser.add_argument("--out-dir", default="out/finetune")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="data-loader processes (decode, augment, EDA, mask); 0 on a CPU (see pretrain.py)")
    parser.add_argument("--seed", type=int, default=42, help="official: 42 + rank")
    parser.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    parser.add_argument("--resume", help="checkpoint to continue from, with its saved settings")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < 1:
        parser.error("--warmup is a fraction in [0, 1)")
    return fill_preset_defaults(args, parser, PRESET_DEFAULTS)


class FinetuneObjective(torch.nn.Module):
    """E10-E12 on one batch; the EDA copy of each caption shares its image and identity."""

    def __init__(self, model, eda_weight, uniform_negatives):
        super().__init__()
        self.model, self.eda_weight, self.uniform_negatives = model, eda_weight, uniform_negatives

    def forward(self, batch, generator, progress):
        return self.losses(batch, *self.draw(batch, generator, progress))

    def draw(self, batch, generator, progress):
        """The step's random numbers -> the arguments of `losses` after the batch. Drawn first, in eager mode
        (torch.compile cannot trace an op that takes a Generator), so that `losses` compiles whole."""
        batch_size = batch["pid"].shape[0]
        negatives = categorical_noise((2, 2, batch_size, batch_size), generator)  # caption, EDA copy
        return negatives, progress < self.uniform_negatives

    def losses(self, batch, negatives, uniform):
        model = self.model
        images = device_images(batch["image"], batch["erase"], batch["norm"])         # (B, 3, H, W)
        image_embeds = model.encode_image(images)                                     # (B, N, Dv)
        image_feat = model.image_feat(image_embeds)                                   # (B, D)
        image_kv = model.cross_kv(image_embeds)       # each image's cross-attention keys/values, projected once
        pid = batch["pid"]
        loss_itc, loss_itm, _ = retrieval_losses(model, image_kv, image_feat, batch["input_ids"],
                                                 batch["attention_mask"], pid, negatives[0], uniform)
        loss_itc_eda, loss_itm_eda, _ = retrieval_losses(model, image_kv, image_feat, batch["eda_input_ids"],
                                                         batch["eda_attention_mask"], pid, negatives[1], uniform)
        # MLM on the original caption only (E12).
        mlm_logits = model.mlm_logits(batch["masked_ids"], batch["attention_mask"], None, batch["masked_pos"],
                                      image_kv=image_kv)                              # (B, M, V)
        loss_mlm = mlm_loss(mlm_logits, batch["masked_labels"])
        return finetune_objective(loss_itc, loss_itc_eda, loss_itm, loss_itm_eda, loss_mlm, self.eda_weight)


def initial_model(args, corpus):
    """(model, tokenizer): from --resume or --init (ours or an official release, whose vocabulary comes from
    --bert), or fresh from --preset (+ --bert)."""
    source = args.resume or args.init
    if source:
        return load_model_and_tokenizer(source, args.bert, torch.device("cpu"))
    tokenizer = Tokenizer.from_bert_dir(args.bert) if args.bert else Tokenizer.from_corpus(corpus)
    config = CONFIGS[args.preset]
    model = APTM(type(config)(**{**asdict(config), "vocab_size": tokenizer.vocab_size}))
    if args.bert:
        load_bert(model, args.bert)
    return model, tokenizer


def main(argv=None):
    args = init_run(get_args(argv))
    data_root = args.data_root
    if args.dataset == "synthetic":
        args.synthetic = synthetic_world(args.data_dir)
        data_root = args.synthetic["cuhk_raw"]
    elif not data_root:
        fail(f"--dataset {args.dataset} needs --data-root (the dataset folder)")
    args.val_root = data_root
    entries = load_retrieval(args.dataset, data_root, "train")
    check_images([entry[0] for entry in entries])
    model, tokenizer = initial_model(args, corpus=[entry[1] for entry in entries])
    model = model.to(args.device_obj)
    config = model.config
    normalization = NORMALIZATION["cuhk" if args.dataset == "synthetic" else args.dataset]
    dataset = FinetuneDataset(entries, train_transform(config.image_size, normalization, args.erasing_p), tokenizer,
                              config.max_tokens, seed=args.seed, clean_eda=args.dataset in ("icfg", "rstp"))
    # Model selection on the validation split; ICFG-PEDES has none, so its last epoch is kept.
    has_val = args.dataset != "icfg"
    monitor = retrieval_monitor(args, tokenizer, args.dataset if has_val else "none", normalization)
    t0 = time.time()
    train(args, FinetuneObjective(model, args.eda_weight, args.uniform_negatives), model, tokenizer, dataset, monitor,
          double_lr="finetune", schedule="step", warmup=args.warmup)
    if args.rank == 0:
        minutes = (time.time() - t0) / 60
        best = os.path.join(args.out_dir, "best.pt")
        # No best.pt without a validation split, or when --max-steps ended the run before an epoch did.
        chosen = best if has_val and os.path.isfile(best) else os.path.join(args.out_dir, "ckpt.pt")
        model.load_state_dict(read_checkpoint(chosen)["model"])
        testset = load_retrieval(args.dataset, data_root, "test")
        test = evaluate_retrieval(model, tokenizer, testset, args.device_obj, k_rerank=args.k_rerank,
                                  normalization=normalization, batch_size=args.eval_batch_size)
        print(f"done in {minutes:.1f} min; test with {chosen}: " +
              " | ".join(f"{k} {test[k]:.2f}" for k in ("R1", "R5", "R10", "mAP", "mINP")))
        with open(os.path.join(args.out_dir, "results.json"), "w") as f:
            json.dump(dict(checkpoint=chosen, test=test), f, indent=1)
    cleanup_distributed()


if __name__ == "__main__":
    main()
