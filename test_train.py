import os
import subprocess
import sys

import pytest
import torch

import attributes
import finetune
import pretrain
from data import make_synthetic
from losses import itc_loss

TINY_WORLD = dict(mals_ids=40, mals_images_per_id=2, train_ids=12, val_ids=4, test_ids=4, images_per_id=2,
                  attr_train=16, attr_test=16, image_size=(96, 32))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world") / "synthetic")
    make_synthetic(root, workers=1, **TINY_WORLD)
    return root


def run_args(world, out_dir, *extra):
    return ["--data-dir", world, "--out-dir", str(out_dir), "--batch-size", "8", "--workers", "0",
            "--log-every", "1", *extra]


def test_get_lr_follows_spec_schedules():
    """spec §5.2: lr 0 at step 0, linear warm-up, linear decay; the step schedule drops at 4W and 7W."""
    T, W = 100, 10
    assert pretrain.get_lr(0, T, W, "linear") == 0
    assert pretrain.get_lr(5, T, W, "linear") == pytest.approx(0.5)
    assert pretrain.get_lr(10, T, W, "linear") == pytest.approx(1.0)
    assert pretrain.get_lr(55, T, W, "linear") == pytest.approx(0.5)
    assert pretrain.get_lr(39, T, W, "step") == pytest.approx(61 / 90)
    assert pretrain.get_lr(40, T, W, "step") == pytest.approx(0.5 * 60 / 90)
    assert pretrain.get_lr(70, T, W, "step") == pytest.approx(0.2 * 30 / 90)


def test_epoch_batches_resume_and_ranks():
    """A resumed epoch sees exactly the remaining batches; ranks get disjoint shares (drop_last)."""
    full = list(pretrain.EpochBatches(50, 4, seed=1, epoch=3))
    assert list(pretrain.EpochBatches(50, 4, seed=1, epoch=3, start=5)) == full[5:]
    ranks = [sum(pretrain.EpochBatches(50, 4, seed=1, epoch=3, rank=r, world_size=2), []) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 24 and not set(ranks[0]) & set(ranks[1])


def test_pretrain_smoke_and_exact_resume(world, tmp_path):
    """N steps in one go equal N/2 steps + --resume + N/2 steps, weight for weight (DESIGN §6)."""
    pretrain.main(run_args(world, tmp_path / "a", "--max-steps", "4"))
    pretrain.main(run_args(world, tmp_path / "b", "--max-steps", "2"))
    pretrain.main(["--resume", str(tmp_path / "b" / "ckpt.pt"), "--max-steps", "4"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    log = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and all(key in log[-1] for key in ("itc", "itm", "mlm", "iac", "iam", "mam", "total"))


def test_finetune_and_evaluate_from_pretrained(world, tmp_path, capsys):
    """pretrain → finetune --init → evaluate --ckpt → attributes --ckpt: the whole chain on CPU."""
    pretrain.main(run_args(world, tmp_path / "pre", "--epochs", "1", "--val-dataset", "none"))
    init = str(tmp_path / "pre" / "ckpt.pt")
    finetune.main(run_args(world, tmp_path / "ft", "--init", init, "--epochs", "2", "--k-rerank", "4"))
    out = capsys.readouterr().out
    assert "val_R1" in out and "test with" in out
    assert (tmp_path / "ft" / "best.pt").exists()
    metrics = attributes.main(["--ckpt", init, "--data-root", world])
    assert set(metrics) == {"mA", "Acc", "Prec", "Rec", "F1"}


def test_finetune_from_random_init_and_bad_init(world, tmp_path, capsys):
    finetune.main(run_args(world, tmp_path / "ft", "--max-steps", "2"))
    with pytest.raises(SystemExit) as error:
        finetune.main(run_args(world, tmp_path / "ft2", "--init", str(tmp_path / "missing.pt")))
    assert error.value.code == 2 and "missing.pt" in capsys.readouterr().err


def _ddp_itc_worker(rank, world_size, init_file, image_feat, text_feat, pid, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    share = image_feat.shape[0] // world_size
    local = slice(rank * share, (rank + 1) * share)
    v = image_feat[local].clone().requires_grad_(True)
    t = text_feat[local].clone().requires_grad_(True)
    loss = itc_loss(pretrain.gather(v), pretrain.gather(t), pretrain.gather(pid[local]), torch.tensor(0.07))
    loss.backward()
    torch.save(dict(loss=loss.detach(), v_grad=v.grad, t_grad=t.grad), os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gathered_itc_equals_one_process(tmp_path):
    """ITC over features gathered from 2 gloo processes equals ITC on the concatenated batch, and each process's
    feature gradient, once DDP has averaged it over the 2 ranks, equals its slice of the one-process gradient."""
    generator = torch.Generator().manual_seed(0)
    image_feat, text_feat = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    pid = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5])
    # fork, not spawn: the children need not import torch and this module again (tens of seconds on 2 cores)
    context = torch.multiprocessing.get_context("fork")
    workers = [context.Process(target=_ddp_itc_worker, args=(rank, 2, str(tmp_path / "init"), image_feat,
                                                              text_feat, pid, str(tmp_path))) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    v, t = image_feat.clone().requires_grad_(True), text_feat.clone().requires_grad_(True)
    loss = itc_loss(v, t, pid, torch.tensor(0.07))
    loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(result["loss"], loss.detach(), atol=1e-6)
        assert torch.allclose(result["v_grad"] / 2, v.grad[rank * 4:(rank + 1) * 4], atol=1e-6)
        assert torch.allclose(result["t_grad"] / 2, t.grad[rank * 4:(rank + 1) * 4], atol=1e-6)


def test_torchrun_two_processes_pretrain(world, tmp_path):
    """`torchrun --nproc_per_node 2 pretrain.py` runs a few DDP steps on CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "pretrain.py", *run_args(world, tmp_path, "--max-steps", "2", "--val-dataset", "none",
                                        "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 x cpu" in done.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2
