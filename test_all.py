"""minAPTM's tests: pytest, CPU, offline, tiny configs, well under two minutes on 2 cores.

    pip install -r requirements.txt pytest && HF_HUB_OFFLINE=1 python -m pytest -q test_all.py

One oracle test per equation (test_E1_... to test_E7_...) against a deliberately naive loop written from the spec,
so the file doubles as an autograder; invariants of each module; smoke runs of every script's main([...]); exact
resume, DDP equivalence and a torchrun run of the training loop. No timing thresholds: speed is bench.py's job.
"""
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
from dataclasses import asdict, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub: set before transformers is imported

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import attributes
import bench
import data
import evaluate
import finetune
import losses
import model as M
import pretrain
import synthetic
from model import APTM, CONFIGS, build_from_checkpoint, load_bert, load_state, load_swin, optimizer_groups


# =====================================================================================================================
# the file layout (DESIGN.md §2)
# =====================================================================================================================


def test_library_files_import_no_script():
    """model, losses, data, synthetic and attributes import no script (pretrain, finetune, evaluate, bench): no
    import cycle, and a library can be read without the training code."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys, attributes, data, losses, model, synthetic; "
            "print(sorted({'pretrain', 'finetune', 'evaluate', 'bench'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# =====================================================================================================================
# model.py
# =====================================================================================================================


SMALL = replace(CONFIGS["tiny"], vocab_size=50)


def small_model(seed=0, config=SMALL):
    torch.manual_seed(seed)
    return APTM(config)


def text_batch(config, B=3, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (B, L), generator=g)
    ids[:, 0] = 1  # [CLS]-like
    atts = torch.ones(B, L, dtype=torch.long)
    atts[1, 5:] = 0
    atts[2, 3:] = 0
    ids[atts == 0] = 0
    return ids, atts


def images_for(config, B=3, seed=0):
    return torch.randn(B, 3, *config.image_size, generator=torch.Generator().manual_seed(seed))


def official_inventory(config):
    """Key -> shape of the official APTM state dict, written out from the tables of spec §8.2 (not from model.py)."""
    keys = {"temp": ()}
    C0, Dv, Dt, V, D = config.swin_dim, config.vision_width, config.hidden_size, config.vocab_size, config.embed_dim
    H, W = config.image_size[0] // 4, config.image_size[1] // 4
    ve = "vision_encoder."
    keys |= {ve + "patch_embed.proj.weight": (C0, 3, 4, 4), ve + "patch_embed.proj.bias": (C0,),
             ve + "patch_embed.norm.weight": (C0,), ve + "patch_embed.norm.bias": (C0,)}
    for i, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
        C, h, w = C0 * 2**i, H // 2**i, W // 2**i
        window = min(config.window_size, h, w)
        for j in range(depth):
            b = f"{ve}layers.{i}.blocks.{j}."
            keys |= {b + "norm1.weight": (C,), b + "norm1.bias": (C,),
                     b + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads),
                     b + "attn.relative_position_index": (window**2, window**2),
                     b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
                     b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                     b + "norm2.weight": (C,), b + "norm2.bias": (C,),
                     b + "mlp.fc1.weight": (4 * C, C), b + "mlp.fc1.bias": (4 * C,),
                     b + "mlp.fc2.weight": (C, 4 * C), b + "mlp.fc2.bias": (C,)}
            if j % 2 == 1 and min(h, w) > config.window_size:
                keys[b + "attn_mask"] = ((h // window) * (w // window), window**2, window**2)
        if i < len(config.depths) - 1:
            d = f"{ve}layers.{i}.downsample."
            keys |= {d + "reduction.weight": (2 * C, 4 * C), d + "norm.weight": (4 * C,), d + "norm.bias": (4 * C,)}
    keys |= {ve + "norm.weight": (Dv,), ve + "norm.bias": (Dv,)}
    bert, F_ = "text_encoder.bert.", config.intermediate_size
    keys |= {bert + "embeddings.position_ids": (1, config.max_position_embeddings),
             bert + "embeddings.word_embeddings.weight": (V, Dt),
             bert + "embeddings.position_embeddings.weight": (config.max_position_embeddings, Dt),
             bert + "embeddings.token_type_embeddings.weight": (2, Dt),
             bert + "embeddings.LayerNorm.weight": (Dt,), bert + "embeddings.LayerNorm.bias": (Dt,)}
    for i in range(config.num_text_layers + config.num_cross_layers):
        lay = f"{bert}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            keys |= {f"{lay}attention.self.{name}.weight": (Dt, Dt), f"{lay}attention.self.{name}.bias": (Dt,)}
        keys |= {lay + "attention.output.dense.weight": (Dt, Dt), lay + "attention.output.dense.bias": (Dt,),
                 lay + "attention.output.LayerNorm.weight": (Dt,), lay + "attention.output.LayerNorm.bias": (Dt,),
                 lay + "intermediate.dense.weight": (F_, Dt), lay + "intermediate.dense.bias": (F_,),
                 lay + "output.dense.weight": (Dt, F_), lay + "output.dense.bias": (Dt,),
                 lay + "output.LayerNorm.weight": (Dt,), lay + "output.LayerNorm.bias": (Dt,)}
        if i >= config.num_text_layers:
            c = lay + "crossattention."
            keys |= {c + "self.query.weight": (Dt, Dt), c + "self.query.bias": (Dt,),
                     c + "self.key.weight": (Dt, Dv), c + "self.key.bias": (Dt,),
                     c + "self.value.weight": (Dt, Dv), c + "self.value.bias": (Dt,),
                     c + "output.dense.weight": (Dt, Dt), c + "output.dense.bias": (Dt,),
                     c + "output.LayerNorm.weight": (Dt,), c + "output.LayerNorm.bias": (Dt,)}
    p = "text_encoder.cls.predictions."
    keys |= {p + "bias": (V,), p + "transform.dense.weight": (Dt, Dt), p + "transform.dense.bias": (Dt,),
             p + "transform.LayerNorm.weight": (Dt,), p + "transform.LayerNorm.bias": (Dt,),
             p + "decoder.weight": (V, Dt), p + "decoder.bias": (V,)}
    keys |= {"vision_proj.weight": (D, Dv), "vision_proj.bias": (D,), "text_proj.weight": (D, Dt),
             "text_proj.bias": (D,), "itm_head.0.weight": (2 * Dt, Dt), "itm_head.0.bias": (2 * Dt,),
             "itm_head.1.weight": (2 * Dt,), "itm_head.1.bias": (2 * Dt,), "itm_head.3.weight": (2, 2 * Dt),
             "itm_head.3.bias": (2,)}
    return keys


def is_buffer(key):
    return any(b in key for b in M.RECOMPUTED_BUFFERS)


def official_state_dict(model, old_prefix=False):
    """Our state dict plus the buffers the official checkpoints carry, optionally with the old BERT prefix."""
    sd = dict(model.state_dict())
    for name, buffer in model.named_buffers():
        if is_buffer(name) and buffer is not None:
            sd[name] = buffer.clone()
    if old_prefix:
        sd = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------- issue 1, 2


def test_parameter_count_aptm_base():
    """Spec §1.6: 214,456,629 trainable parameters (unique tensors), split as in the table."""
    with torch.device("meta"):
        model = APTM(CONFIGS["aptm-base"])
    count = lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert count(model) == 214_456_629
    assert count(model.vision_encoder) == 86_753_016
    heads = count(model.vision_proj) + count(model.text_proj) + count(model.itm_head) + model.temp.numel()
    assert heads == 1_646_595


def test_state_dict_inventory_aptm_base():
    """Spec §8.2: 629 official entries = 602 tensors + 27 buffers; ours holds exactly the 602, same shapes."""
    with torch.device("meta"):
        model = APTM(CONFIGS["aptm-base"])
    official = official_inventory(CONFIGS["aptm-base"])
    assert len(official) == 629
    tensors = {k: v for k, v in official.items() if not is_buffer(k)}
    assert len(tensors) == 602
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == tensors
    prefixes = {}
    for k in official:
        prefixes[k.split(".")[0]] = prefixes.get(k.split(".")[0], 0) + 1
    assert prefixes == {"vision_encoder": 353, "text_encoder": 265, "itm_head": 6, "vision_proj": 2,
                        "text_proj": 2, "temp": 1}
    # the buffers we recompute have the official shapes too
    buffers = {k: tuple(v.shape) for k, v in model.named_buffers() if is_buffer(k) and v is not None}
    assert all(official[k] == shape for k, shape in buffers.items() if k in official)


def test_swin_loads_official_key_names_strictly(tmp_path, capsys):
    """A Microsoft-layout Swin .pth (buffers + 22k head) loads strictly once buffers and head are dropped."""
    source = small_model(1)
    state = {k[len("vision_encoder."):]: v for k, v in official_state_dict(source).items()
             if k.startswith("vision_encoder.")}
    assert any("relative_position_index" in k for k in state) and any("attn_mask" in k for k in state)
    state["head.weight"], state["head.bias"] = torch.randn(7, SMALL.vision_width), torch.randn(7)
    torch.save({"model": state}, tmp_path / "swin.pth")
    target = small_model(2)
    load_swin(target, tmp_path / "swin.pth")
    expected = {k: v for k, v in state.items() if not is_buffer(k) and not k.startswith("head.")}
    assert f"load_swin: {len(expected)} tensors" in capsys.readouterr().out
    for k, v in target.vision_encoder.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    state["layers.0.blocks.0.attn.extra"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    capsys.readouterr()
    expect_exit(capsys, "layers.0.blocks.0.attn.extra", load_swin, target, tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------- issue 3


def test_swin_geometry_aptm_base():
    """384x128 -> 49 tokens of 1024; stage 2 window 8 no shift; stage 3 window 4 no shift (spec §1.2)."""
    with torch.device("meta"):
        model = APTM(CONFIGS["aptm-base"])
        out = model.encode_image(torch.empty(2, 3, 384, 128))
    assert out.shape == (2, 49, 1024)
    geometry = [[(b.resolution, b.window, b.shift) for b in layer.blocks] for layer in model.vision_encoder.layers]
    assert geometry[0] == [((96, 32), 8, 0), ((96, 32), 8, 4)]
    assert geometry[1] == [((48, 16), 8, 0), ((48, 16), 8, 4)]
    assert all(g == ((24, 8), 8, 0) for g in geometry[2]) and len(geometry[2]) == 18
    assert geometry[3] == [((12, 4), 4, 0), ((12, 4), 4, 0)]
    assert model.vision_encoder.layers[3].blocks[0].attn.relative_position_bias_table.shape == (49, 32)
    assert model.vision_encoder.layers[0].blocks[1].attn_mask.shape == (48, 64, 64)


def test_swin_geometry_tiny():
    """tiny reads the world's own 192x64 images in 8x8 patches: stage grids 24x8 (window 4, shifted), 12x4, 6x2."""
    config = CONFIGS["tiny"]
    assert config.image_size == synthetic.SYNTHETIC_DEFAULTS["image_size"]  # no resize between world and model
    with torch.device("meta"):
        model = APTM(config)
        out = model.encode_image(torch.empty(2, 3, *config.image_size))
    assert out.shape == (2, 1 + 6 * 2, config.vision_width)  # the mean token + the last stage's 6x2
    geometry = [[(b.resolution, b.window, b.shift) for b in layer.blocks] for layer in model.vision_encoder.layers]
    assert geometry == [[((24, 8), 4, 0), ((24, 8), 4, 2)], [((12, 4), 4, 0)] * 2, [((6, 2), 2, 0)] * 2]


def test_shift_mask_matches_naive_construction():
    """Two tokens of a window may attend iff neither or both were wrapped by the roll, per axis."""
    H, W, window, shift = 24, 8, 4, 2
    mask = M.shifted_window_mask(H, W, window, shift)
    expected = torch.zeros_like(mask)
    for wi in range(H // window):
        for wj in range(W // window):
            tokens = [(wi * window + a, wj * window + b) for a in range(window) for b in range(window)]
            for p, (r1, c1) in enumerate(tokens):
                for q, (r2, c2) in enumerate(tokens):
                    same = (r1 >= H - shift) == (r2 >= H - shift) and (c1 >= W - shift) == (c2 >= W - shift)
                    expected[wi * (W // window) + wj, p, q] = 0.0 if same else -100.0
    assert torch.equal(mask, expected)


def naive_window_attention(attn, x, mask):
    """The official WindowAttention.forward, written as in models/swin_transformer.py."""
    Bw, T, C = x.shape
    nH = attn.num_heads
    q, k, v = attn.qkv(x).reshape(Bw, T, 3, nH, C // nH).permute(2, 0, 3, 1, 4)
    scores = (q * (C // nH) ** -0.5) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(T, T, -1)
    scores = scores + bias.permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        scores = scores.view(Bw // nW, nW, nH, T, T) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, nH, T, T)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(Bw, T, C)
    return attn.proj(out)


def test_window_attention_matches_official_formula():
    model = small_model().eval()
    block = model.vision_encoder.layers[0].blocks[1]  # shifted, 24x8 grid, window 4
    assert block.shift == 2 and block.attn_mask is not None
    torch.nn.init.normal_(block.attn.relative_position_bias_table, std=1.0)
    x = torch.randn(2 * block.attn_mask.shape[0], 16, 32)
    for mask in (block.attn_mask, None):
        torch.testing.assert_close(block.attn(x, mask), naive_window_attention(block.attn, x, mask))


def test_drop_path_on_both_residual_branches():
    block = small_model().vision_encoder.layers[0].blocks[1].train()

    class DropEverything(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    x = torch.randn(2, 24 * 8, 32)
    assert not torch.allclose(block(x), x)
    block.drop_path = DropEverything()
    torch.testing.assert_close(block(x), x)  # both residual branches went through drop_path
    rates = [b.drop_path.p for layer in small_model().vision_encoder.layers for b in layer.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(SMALL.drop_path_rate) and rates == sorted(rates)


# ---------------------------------------------------------------------------------------------- issue 4 (spec issue 7)


def test_load_bert_matches_transformers(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    hf_config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=64, hidden_act="gelu")
    torch.manual_seed(0)
    BertForMaskedLM(hf_config).save_pretrained(tmp_path)
    config = replace(SMALL, vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=64)
    model = small_model(config=config).eval()
    cross_before = {k: v.clone() for k, v in model.state_dict().items() if ".crossattention." in k}
    load_bert(model, tmp_path)
    assert "load_bert:" in capsys.readouterr().out
    ids, atts = text_batch(config, B=3, L=11)
    bert = BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    mlm = BertForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = model.encode_text(ids, atts)
        reference = bert(ids, attention_mask=atts, output_hidden_states=True).hidden_states[config.num_text_layers]
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.text_encoder.cls(ours), mlm.cls(reference), atol=1e-5, rtol=1e-5)
    ours_sd, hf_sd = model.text_encoder.state_dict(), mlm.state_dict()
    for k in ("bert.encoder.layer.2.attention.self.query.weight", "bert.encoder.layer.3.output.dense.weight",
              "bert.encoder.layer.3.intermediate.dense.bias", "cls.predictions.bias"):
        assert torch.equal(ours_sd[k], hf_sd[k])
    for k, v in cross_before.items():
        assert torch.equal(model.state_dict()[k], v)
    predictions = model.text_encoder.cls.predictions
    assert predictions.decoder.weight is model.text_encoder.bert.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias


def test_text_self_attention_is_bidirectional_and_masks_padding():
    model = small_model().eval()
    ids, atts = text_batch(SMALL)
    with torch.no_grad():
        base = model.encode_text(ids, atts)
        later = ids.clone()
        later[0, -1] = (later[0, -1] % (SMALL.vocab_size - 2)) + 1  # last real token of row 0
        assert not torch.allclose(model.encode_text(later, atts)[0, 0], base[0, 0])  # not causal
        padded = ids.clone()
        padded[atts == 0] = 7  # change what sits under the padding
        changed = model.encode_text(padded, atts)
        valid = atts.bool()
        torch.testing.assert_close(changed[valid], base[valid])
        fused = model.encode_cross(base, atts, model.encode_image(images_for(SMALL)))
        fused_padded = model.encode_cross(changed, atts, model.encode_image(images_for(SMALL)))
        torch.testing.assert_close(fused[valid], fused_padded[valid])


# ---------------------------------------------------------------------------------------------- issue 5


@pytest.mark.parametrize("old_prefix", [False, True])
def test_official_checkpoint_round_trip(old_prefix, capsys):
    source = small_model(1)
    with torch.no_grad():
        source.temp.fill_(0.05)
    ckpt = {"model": official_state_dict(source, old_prefix), "config": {"image_res": 384, "batch_size_train": 120}}
    target = small_model(2)
    report = load_state(target, ckpt)
    printed = capsys.readouterr().out
    assert report["tensors loaded"] == len(source.state_dict())
    assert report["recomputed buffers dropped"] == sum(is_buffer(k) for k in ckpt["model"])
    assert ("renamed text_encoder." in printed) == old_prefix
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert target.temp.item() == pytest.approx(0.05)
    predictions = target.text_encoder.cls.predictions
    assert predictions.decoder.weight is target.text_encoder.bert.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias


def test_load_state_errors_name_the_keys(capsys):
    source, target = small_model(1), small_model(2)
    state = official_state_dict(source)
    expect_exit(capsys, "unexpected (1): foo.bar", load_state, target, {**state, "foo.bar": torch.zeros(1)})
    del state["text_proj.bias"]
    expect_exit(capsys, "missing (1): text_proj.bias", load_state, target, state)
    state = official_state_dict(source)
    state["vision_proj.bias"] = torch.zeros(3)
    expect_exit(capsys, "shape mismatch (1): vision_proj.bias", load_state, target, state)


def test_build_from_checkpoint(monkeypatch):
    source = small_model(1).eval()
    ids, atts = text_batch(SMALL)
    images = images_for(SMALL)
    with torch.no_grad():
        expected = source.itm_logits(source.encode_text(ids, atts), atts, source.encode_image(images))
    ours = build_from_checkpoint({"model": source.state_dict(), "config": asdict(SMALL), "step": 3}).eval()
    assert ours.config == SMALL
    # an official release rebuilds as aptm-base; patched to the small geometry to stay fast
    monkeypatch.setitem(M.CONFIGS, "aptm-base", replace(SMALL, vocab_size=12345))
    official = build_from_checkpoint({"model": official_state_dict(source, old_prefix=True),
                                      "config": {"max_tokens": 15, "image_res": 384}}).eval()
    assert official.config.vocab_size == SMALL.vocab_size and official.config.max_tokens == 15
    for model in (ours, official):
        with torch.no_grad():
            got = model.itm_logits(model.encode_text(ids, atts), atts, model.encode_image(images))
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------- issue 6


def test_relative_position_resize_identity_and_cubic_exactness():
    table = torch.randn(13 * 13, 3)
    assert torch.equal(M.resize_relative_position_bias_table(table, 13), table)
    # a not-a-knot cubic spline reproduces any cubic polynomial exactly: an oracle without scipy
    for dst in (15, 7):
        x = torch.tensor(M.geometric_coordinates(13, dst), dtype=torch.float64)
        poly = lambda a, b: 0.3 + a - 0.2 * b + 0.05 * a * b - 0.01 * a**3 + 0.02 * b**2 * a
        dh, dw = torch.meshgrid(x, x, indexing="ij")
        source = poly(dh, dw).reshape(-1, 1).repeat(1, 2)
        out = M.resize_relative_position_bias_table(source, dst)
        t = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
        th, tw = torch.meshgrid(t, t, indexing="ij")
        # the last geometric coordinate is only ≈ dst//2 (bisection), points beyond it are clamped
        inside = (th.abs() <= x[-1]) & (tw.abs() <= x[-1])
        torch.testing.assert_close(out[:, 0].reshape(dst, dst)[inside], poly(th, tw)[inside], atol=1e-9, rtol=0)


def test_relative_position_resize_symmetry_and_range():
    x = torch.tensor(M.geometric_coordinates(13, 15))
    dh, dw = torch.meshgrid(x, x, indexing="ij")
    smooth = torch.stack([torch.exp(-(dh**2 + dw**2) / 8), torch.cos(dh / 3) * torch.cos(dw / 4)], -1)
    table = smooth.reshape(169, 2).float()  # symmetric under (dh, dw) -> (-dh, -dw)
    for dst in (15, 7):
        out = M.resize_relative_position_bias_table(table, dst).reshape(dst, dst, 2)
        torch.testing.assert_close(out, out.flip(0, 1), atol=1e-6, rtol=0)
        assert out.min() >= table.min() - 1e-3 and out.max() <= table.max() + 1e-3


def test_relative_position_resize_matches_scipy():
    """interp2d(kind='cubic') on a grid = FITPACK regrid s=0 = RectBivariateSpline(kx=ky=3, s=0) (spec §1.2)."""
    interpolate = pytest.importorskip("scipy.interpolate")
    import numpy as np

    table = torch.randn(169, 4, generator=torch.Generator().manual_seed(0))
    for dst in (15, 7):
        x = np.array(M.geometric_coordinates(13, dst))
        t = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
        ours = M.resize_relative_position_bias_table(table.double(), dst)
        for head in range(4):
            z = table[:, head].double().reshape(13, 13).numpy()
            fitpack = interpolate.RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)(t, t)
            assert np.abs(ours[:, head].reshape(dst, dst).numpy() - fitpack).max() < 1e-9
            rows = interpolate.make_interp_spline(x, z, k=3, bc_type="not-a-knot")(np.clip(t, x[0], x[-1]))
            both = interpolate.make_interp_spline(x, rows.T, k=3, bc_type="not-a-knot")(np.clip(t, x[0], x[-1])).T
            assert np.abs(ours[:, head].reshape(dst, dst).numpy() - both).max() < 1e-9


# ---------------------------------------------------------------------------------------------- issue 7


def test_encode_cross_with_cached_kv_equals_plain_path():
    model = small_model().eval()
    ids, atts = text_batch(SMALL, B=4)
    with torch.no_grad():
        image_embeds = model.encode_image(images_for(SMALL, B=2))  # (2, N, Dv)
        text_embeds = model.encode_text(ids, atts)
        pairs = torch.tensor([0, 1, 1, 0])
        plain = model.encode_cross(text_embeds, atts, image_embeds[pairs])
        kv = model.cross_kv(image_embeds)
        cached = model.encode_cross(text_embeds, atts, image_kv=[(k[pairs], v[pairs]) for k, v in kv])
        torch.testing.assert_close(cached, plain)
        itm = model.itm_logits(text_embeds, atts, image_embeds[pairs])
    assert itm.shape == (4, 2) and itm.dtype == torch.float32
    assert image_embeds.shape == (2, 1 + 6 * 2, SMALL.vision_width)


def test_itm_and_mlm_logits_equal_the_full_fusion_pass_with_gradients():
    """itm_logits and mlm_logits compute the last fusion layer at [CLS] / the masked positions only: same logits
    and gradients as their heads on those rows of the whole pass (padded rows and a repeated position included),
    with and without activation checkpointing."""
    ids, atts = text_batch(SMALL)
    masked_pos = torch.tensor([[1, 2], [3, 0], [0, 0]])  # (B, M)
    index = masked_pos[..., None].expand(-1, -1, SMALL.hidden_size)
    for checkpointing in (False, True):
        results = []
        for ours in (True, False):
            model = small_model().train()
            model.checkpointing = checkpointing
            image_embeds = model.encode_image(images_for(SMALL))
            text_embeds = model.encode_text(ids, atts)
            if ours:
                itm = model.itm_logits(text_embeds, atts, image_embeds)
                mlm = model.mlm_logits(ids, atts, image_embeds, masked_pos)
            else:
                itm = model.itm_head(model.encode_cross(text_embeds, atts, image_embeds)[:, 0]).float()
                hidden = model.encode_cross(model.encode_text(ids, atts), atts, image_embeds)
                mlm = model.text_encoder.cls(hidden.gather(1, index)).float()
            ((itm * torch.tensor([1.0, -2.0])).sum() + mlm.logsumexp(-1).sum()).backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            results.append((itm.detach(), mlm.detach(), grads))
        (itm, mlm, grads), (itm_full, mlm_full, grads_full) = results
        torch.testing.assert_close(itm, itm_full)
        torch.testing.assert_close(mlm, mlm_full)
        assert grads.keys() == grads_full.keys()
        for name in grads_full:
            torch.testing.assert_close(grads[name], grads_full[name], msg=name)


def test_mlm_logits_shape_and_gather():
    model = small_model().eval()
    ids, atts = text_batch(SMALL)
    masked_pos = torch.tensor([[1, 2], [3, 0], [0, 0]])
    with torch.no_grad():
        image_embeds = model.encode_image(images_for(SMALL))
        logits = model.mlm_logits(ids, atts, image_embeds, masked_pos)
        hidden = model.encode_cross(model.encode_text(ids, atts), atts, image_embeds)
        full = model.text_encoder.cls(hidden)
    assert logits.shape == (3, 2, SMALL.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[0, 1], full[0, 2])
    torch.testing.assert_close(logits[1, 0], full[1, 3])


def test_every_parameter_gets_a_gradient():
    model = small_model().train()
    ids, atts = text_batch(SMALL)
    image_embeds = model.encode_image(images_for(SMALL))
    text_embeds = model.encode_text(ids, atts)
    sim = F.normalize(model.image_feat(image_embeds), dim=-1) @ F.normalize(model.text_feat(text_embeds), dim=-1).t()
    loss = (sim / model.temp).logsumexp(1).mean() + model.itm_logits(text_embeds, atts, image_embeds).sum()
    loss = loss + model.mlm_logits(ids, atts, image_embeds, torch.tensor([[1], [2], [1]])).logsumexp(-1).mean()
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_optimizer_groups():
    model = small_model()
    names = {id(p): n for n, p in model.named_parameters()}
    for double_lr in ("cross", "finetune", "none"):
        groups = optimizer_groups(model, weight_decay=0.01, lr=1e-4, lr_mult=2.0, double_lr=double_lr)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(names) and len(ids) == len(set(ids))  # each parameter exactly once
        assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.01, 1e-4), (0.0, 1e-4), (0.01, 2e-4), (0.0, 2e-4)]
        where = {names[id(p)]: i for i, g in enumerate(groups) for p in g["params"]}
        assert where["temp"] == 0 and where["text_encoder.bert.embeddings.word_embeddings.weight"] == 0
        assert where["vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"] == 1
        assert where["text_encoder.bert.embeddings.LayerNorm.weight"] == 1
        assert "text_encoder.cls.predictions.decoder.weight" not in where  # tied: counted once
        doubled = {n for n, i in where.items() if i >= 2}
        if double_lr == "cross":
            assert doubled == {n for n in names.values() if ".crossattention." in n}
            assert where["text_encoder.bert.encoder.layer.2.crossattention.self.key.weight"] == 2
            assert where["text_encoder.bert.encoder.layer.2.crossattention.output.LayerNorm.bias"] == 3
            assert where["itm_head.1.weight"] == 0  # the ITM LayerNorm weight is decayed (spec §5.1)
        elif double_lr == "finetune":
            expected = ("vision_encoder.layers.1.", "vision_encoder.layers.2.", "text_encoder.bert.encoder.layer.0.",
                        "text_encoder.bert.encoder.layer.1.", "text_encoder.bert.encoder.layer.2.",
                        "text_encoder.bert.encoder.layer.3.", "text_encoder.cls.", "vision_proj.", "text_proj.",
                        "itm_head.")
            assert doubled == {n for n in names.values() if n.startswith(expected)}
            assert where["itm_head.1.weight"] == 2
        else:
            assert doubled == set()
    with pytest.raises(ValueError):
        optimizer_groups(model, double_lr="all")


def test_finetune_double_lr_set_aptm_base():
    """Spec §5.1 at paper scale: Swin stages 2-3, BERT layers 4, 5, 10, 11, MLM head, projections, ITM head."""
    prefixes = M.double_lr_prefixes(CONFIGS["aptm-base"], "finetune")
    layers = sorted(int(p.split(".")[4]) for p in prefixes if p.startswith("text_encoder.bert.encoder.layer."))
    assert layers == [4, 5, 10, 11]
    assert {p for p in prefixes if p.startswith("vision_encoder.")} == {"vision_encoder.layers.2.",
                                                                        "vision_encoder.layers.3."}


# =====================================================================================================================
# losses.py and attributes.py (tables, targets, metrics)
# =====================================================================================================================


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


def test_uniform_negatives_ignore_similarity_but_not_identity():
    """uniform=True: every other identity is equally likely whatever the ITC similarities (here image 1 is the
    text-0 twin at τ 0.01, which the similarity-weighted sampler nearly always picks); the same identity never."""
    B, draws = 4, 3000
    text_feat = torch.eye(B)
    image_feat = text_feat.roll(1, dims=0)  # image b+1 has text b's features
    pid = torch.tensor([0, 1, 2, 2])
    generator = torch.Generator().manual_seed(0)
    uniform, hard = torch.zeros(B), torch.zeros(B)
    for _ in range(draws):
        neg_image_idx, neg_text_idx = losses.sample_hard_negatives(image_feat, text_feat, pid, 0.01, generator,
                                                                   uniform=True)
        assert (pid[neg_image_idx] != pid).all() and (pid[neg_text_idx] != pid).all()
        uniform[neg_image_idx[0]] += 1
        hard[losses.sample_hard_negatives(image_feat, text_feat, pid, 0.01, generator)[0][0]] += 1
    # text 0 (pid 0) draws images 1, 2, 3 each with probability 1/3 ...
    assert uniform[0] == 0 and torch.allclose(uniform[1:] / draws, torch.full((3,), 1 / 3), atol=0.03)
    # ... where the similarity-weighted sampler takes image 1, its twin
    assert hard[1] / draws > 0.99


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
        image_idx, has_true = losses.sample_mam_images(m, torch.Generator().manual_seed(seed))
        assert has_true.tolist() == [True, True, False, False] and image_idx.shape == (4,)
        assert (m[image_idx[:2], torch.arange(2)] == 1).all()
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


def test_pair_auc_against_all_pairs():
    """AUC_k = P(d_pos > d_neg) + ½ P(tie), by a loop over every (label-1, label-0) pair of images."""
    torch.manual_seed(15)
    margin = torch.randint(-3, 4, (30, 4)).float()  # small integers: plenty of ties
    gt = torch.randint(0, 2, (30, 4))
    gt[:, 3] = 1  # no label-0 image: undefined
    got = attributes.pair_auc(margin, gt)
    for k in range(3):
        pairs = [(margin[n, k], margin[m, k]) for n in range(30) for m in range(30) if gt[n, k] == 1 and gt[m, k] == 0]
        expected = 100 * sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
        assert abs(got[k].item() - expected) < 1e-9
    assert torch.isnan(got[3])
    assert attributes.pair_auc(torch.zeros(30, 3), gt[:, :3]).eq(50).all()  # a constant margin ranks nothing
    with pytest.raises(ValueError):
        attributes.pair_auc(margin, torch.full((30, 4), -1))


# ---------------------------------------------------------------------------------------------------
# A fake model with the model.py API, so that these tests do not depend on model.py
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
    image_idx, has_true = losses.sample_mam_images(m, generator)  # the official code keeps only the prompts
    prompt_idx = has_true.nonzero().squeeze(1)  # with a true image (R,)
    image_idx = image_idx[prompt_idx]
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
    pred = attributes.predict_attributes(attributes.attribute_scores(model, image_embeds, prompt_embeds,
                                                                     batch["prompt_atts"]))
    assert pred.shape == (5, 4) and pred.dtype == torch.long
    for b in range(5):  # the official loop: one image against all prompts
        s = model.itm_logits(prompt_embeds, batch["prompt_atts"], image_embeds[b].repeat(8, 1, 1))[:, 1]
        for k in range(4):
            assert pred[b, k] == (1 if s[2 * k + 1] > s[2 * k] else 0)
    small_chunks = attributes.predict_attributes(attributes.attribute_scores(model, image_embeds, prompt_embeds,
                                                                             batch["prompt_atts"], pair_batch_size=3))
    assert torch.equal(pred, small_chunks)


def test_predict_attributes_ties_go_to_label_0():
    class ConstantITM(FakeAPTM):
        def itm_logits(self, text_embeds, text_atts, image_embeds):
            return torch.zeros(text_embeds.shape[0], 2)

    model, batch = ConstantITM(), fake_batch(B=3, K=4)
    prompt_embeds = model.encode_text(batch["prompt_ids"], batch["prompt_atts"])
    scores = attributes.attribute_scores(model, batch["image_embeds"], prompt_embeds, batch["prompt_atts"])
    assert torch.equal(attributes.predict_attributes(scores), torch.zeros(3, 4, dtype=torch.long))


# =====================================================================================================================
# data.py
# =====================================================================================================================


# ----------------------------------------------------------------------------------------------------------
# helpers

def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def write_image(path, colour=(120, 30, 40), size=(8, 24)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def expect_exit(capsys, fragment, fn, *args, **kwargs):
    with pytest.raises(SystemExit) as info:
        fn(*args, **kwargs)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err, err
    return err


LABEL27 = [1, 0] + [-1] * 25


@pytest.fixture(scope="module")
def tokenizer():
    return data.Tokenizer.from_corpus(["a man in a red shirt walking", "the person wears black pants"])


# ----------------------------------------------------------------------------------------------------------
# readers: every format written as a tiny fixture and read back (spec §4.2–4.4)

def test_read_mals_glob_and_pid_remap(tmp_path):
    root = tmp_path / "MALS"
    for name in ("a/0.jpg", "a/1.jpg", "b/0.jpg"):
        write_image(root / name)
    write_json(tmp_path / "ann" / "g_0_attrs.json", [
        {"image": "a/0.jpg", "caption": "a man", "image_id": "x_0", "label": LABEL27},
        {"image": "a/1.jpg", "caption": "a woman", "image_id": "x_1", "label": [0] * 27}])
    write_json(tmp_path / "ann" / "g_1_attrs.json", [
        {"image": "b/0.jpg", "caption": "a child", "image_id": "y_0", "label": [-1] * 27}])
    entries = data.read_mals(str(tmp_path / "ann" / "g_*_attrs.json"), str(root))
    assert [e["pid"] for e in entries] == [0, 1, 2]
    assert entries[0] == {"image": str(root / "a/0.jpg"), "caption": "a man", "pid": 0, "label": LABEL27}


def _raw_cuhk(tmp_path):
    items = [
        {"split": "train", "captions": ["A man.", "A tall man."], "file_path": "CUHK01/1.png", "id": 7},
        {"split": "train", "captions": ["A woman."], "file_path": "CUHK01/2.png", "id": 3},
        {"split": "train", "captions": ["The man again."], "file_path": "CUHK01/3.png", "id": 7},
        {"split": "val", "captions": ["val cap"], "file_path": "CUHK01/4.png", "id": 11},
        {"split": "test", "captions": ["Test, one!", "test two"], "file_path": "cam_a/5.png", "id": 12},
        {"split": "test", "captions": ["test three"], "file_path": "cam_a/6.png", "id": 13},
    ]
    for item in items:
        write_image(tmp_path / "imgs" / item["file_path"])
        item["processed_tokens"] = [c.lower().split() for c in item["captions"]]
    return write_json(tmp_path / "reid_raw.json", items)


def test_read_cuhk_raw_train_and_test(tmp_path):
    path = _raw_cuhk(tmp_path)
    train = data.read_retrieval("cuhk", path, "train")
    assert [(os.path.basename(p), c, pid) for p, c, pid in train] == [
        ("1.png", "A man.", 0), ("1.png", "A tall man.", 0), ("2.png", "A woman.", 1), ("3.png", "The man again.", 0)]
    test = data.read_retrieval("cuhk", path, "test")
    assert [os.path.basename(p) for p in test.image_paths] == ["5.png", "6.png"]
    assert test.g_pids == [12, 13] and test.q_pids == [12, 12, 13]
    assert test.captions == ["Test, one!", "test two", "test three"]  # CUHK test captions are not cleaned
    assert data.read_retrieval("cuhk", path, "val").q_pids == [11]
    assert data.load_retrieval("cuhk", str(tmp_path), "test").captions == test.captions
    assert data.load_retrieval("cuhk", path, "test") == test  # a file works too


def test_read_icfg_raw_cleans_test_captions(tmp_path):
    items = [{"split": "train", "captions": ["A Man, walking."], "file_path": "train/0001/a.jpg", "id": 1},
             {"split": "test", "captions": ["A WOMAN in red-and-blue!"], "file_path": "test/0002/b.jpg", "id": 2}]
    for item in items:
        write_image(tmp_path / "imgs" / item["file_path"])
        item["processed_tokens"] = []
    write_json(tmp_path / "ICFG-PEDES.json", items)
    train = data.load_retrieval("icfg", str(tmp_path), "train")
    assert train[0][1] == "A Man, walking."  # train captions stay raw (spec §4.7 quirk)
    test = data.load_retrieval("icfg", str(tmp_path), "test")
    assert test.captions == ["a woman in red and blue"] and test.g_pids == [2]


def test_read_rstp_raw(tmp_path):
    items = [{"id": 5, "img_path": "0005_c1.jpg", "captions": ["One.", "Two!"], "split": "train"},
             {"id": 9, "img_path": "0009_c2.jpg", "captions": ["A Girl; in PINK.", "x"], "split": "test"}]
    for item in items:
        write_image(tmp_path / "imgs" / item["img_path"])
    write_json(tmp_path / "data_captions.json", items)
    assert [e[2] for e in data.load_retrieval("rstp", str(tmp_path), "train")] == [0, 0]
    test = data.load_retrieval("rstp", str(tmp_path), "test")
    assert test.captions == ["a girl in pink", "x"] and test.q_pids == [9, 9]


def test_read_processed_json(tmp_path):
    for name in ("imgs/p/1.jpg", "imgs/p/2.jpg"):
        write_image(tmp_path / name)
    write_json(tmp_path / "cuhk_train.json", [{"image": "p/1.jpg", "caption": "c1", "image_id": 40},
                                              {"image": "p/2.jpg", "caption": "c2", "image_id": 41},
                                              {"image": "p/1.jpg", "caption": "c3", "image_id": 40}])
    write_json(tmp_path / "cuhk_test.json", [{"image": "p/1.jpg", "caption": ["a", "b"], "image_id": 40},
                                             {"image": "p/2.jpg", "caption": ["c"], "image_id": 41}])
    write_json(tmp_path / "icfg_test.json", [{"image": "p/1.jpg", "caption": ["first", "second"], "image_id": 1}])
    train = data.read_retrieval("cuhk", str(tmp_path / "cuhk_train.json"), "train")
    assert [e[2] for e in train] == [0, 1, 0] and os.path.exists(train[0][0])  # image root "imgs" found
    test = data.read_retrieval("cuhk", str(tmp_path / "cuhk_test.json"), "test")
    assert test.captions == ["a", "b", "c"] and test.q_pids == [40, 40, 41] and test.g_pids == [40, 41]
    assert data.read_retrieval("icfg", str(tmp_path / "icfg_test.json"), "test").captions == ["first"]
    assert data.load_retrieval("cuhk", str(tmp_path), "train") == train


def test_read_attributes_json_and_mat(tmp_path, monkeypatch, capsys):
    write_image(tmp_path / "release_data" / "000001.jpg")
    label = [0, 1] * 13
    path = write_json(tmp_path / "PA100K_test.json", [{"image": "000001.jpg", "label": label}])
    entries = data.read_attributes(path, split="test")
    assert entries == [(str(tmp_path / "release_data" / "000001.jpg"), label)]
    assert data.read_attributes(str(tmp_path), split="test") == entries
    scipy_io = pytest.importorskip("scipy.io")
    mat = str(tmp_path / "mat" / "annotation.mat")
    write_image(tmp_path / "mat" / "release_data" / "release_data" / "000002.jpg")
    scipy_io.savemat(mat, {"test_images_name": np.array([["000002.jpg"]], dtype=object),
                           "test_label": np.array([label])})
    assert data.read_attributes(mat, split="test")[0][1] == label
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # scipy missing → a clear message
    expect_exit(capsys, "needs scipy", data.read_attributes, mat, split="test")


# ----------------------------------------------------------------------------------------------------------
# bad input: exit status 2 and a message naming the file, the entry and the fix

def test_bad_inputs_fail_clearly(tmp_path, capsys):
    expect_exit(capsys, "file not found", data.read_mals, str(tmp_path / "nope_attrs.json"), str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "a.jpg",')
    expect_exit(capsys, "malformed JSON", data.read_mals, str(bad), str(tmp_path))
    write_image(tmp_path / "a.jpg")
    short = write_json(tmp_path / "short_attrs.json", [{"image": "a.jpg", "caption": "x", "image_id": 1,
                                                         "label": [0] * 26}])
    err = expect_exit(capsys, "entry 0", data.read_mals, short, str(tmp_path))
    assert "27" in err and "short_attrs.json" in err
    empty = write_json(tmp_path / "empty_attrs.json", [{"image": "a.jpg", "caption": "  ", "image_id": 1,
                                                         "label": [0] * 27}])
    expect_exit(capsys, "empty or non-text caption", data.read_mals, empty, str(tmp_path))
    nofield = write_json(tmp_path / "nofield_attrs.json", [{"image": "a.jpg", "caption": "x", "label": [0] * 27}])
    expect_exit(capsys, "no \"image_id\" field", data.read_mals, nofield, str(tmp_path))
    missing = write_json(tmp_path / "miss_attrs.json", [{"image": "gone.jpg", "caption": "x", "image_id": 1,
                                                          "label": [0] * 27}])
    err = expect_exit(capsys, "1 of 1 image files are missing", data.read_mals, missing, str(tmp_path))
    assert "gone.jpg" in err
    raw = write_json(tmp_path / "reid_raw.json", [{"split": "dev", "captions": ["x"], "file_path": "a.jpg",
                                                   "id": 1}])
    expect_exit(capsys, "unknown split 'dev'", data.read_retrieval, "cuhk", raw, "train")
    expect_exit(capsys, "unknown split 'val' for icfg", data.read_retrieval, "icfg", raw, "val")
    expect_exit(capsys, "unknown retrieval dataset", data.read_retrieval, "market", raw, "train")
    expect_exit(capsys, "found none of", data.load_retrieval, "rstp", str(tmp_path), "train")
    wrong = write_json(tmp_path / "PA100K_train.json", [{"image": "a.jpg", "label": [0, 1, 2]}])
    expect_exit(capsys, "26 (PA-100K) or 27 (MALS)", data.read_attributes, wrong, split="train")
    write_json(tmp_path / "PA100K_val.json", [{"image": "a.jpg", "label": [0] * 27}])  # MALS labels given as PA-100K
    expect_exit(capsys, "the val labels hold 27 attributes; pa100k has 26", attributes.attribute_split, "pa100k",
                str(tmp_path), "val")
    expect_exit(capsys, "image file not found", data.load_image, str(tmp_path / "gone.jpg"))
    expect_exit(capsys, "first is entry 1", data.check_images, [str(tmp_path / "a.jpg"), "x.jpg", "y.jpg"])


# ----------------------------------------------------------------------------------------------------------
# tokenizer (spec §1.3)

def test_tokenizer_cls_no_sep_padding_truncation(tokenizer):
    ids, mask = tokenizer(["A man, in a RED shirt.", "the person"], max_length=12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == mask.dtype == torch.long
    assert (ids[:, 0] == tokenizer.cls_id).all()
    sep = tokenizer.vocab.index("[SEP]")
    assert not (ids == sep).any()
    assert tokenizer.decode(ids[0].tolist()) == "[CLS] a man , in a red shirt ."
    assert mask[0].tolist() == [1] * 9 + [0] * 3 and (ids[0, 9:] == 0).all() and tokenizer.pad_id == 0
    ids, mask = tokenizer(["a man in a red shirt walking"], max_length=4)
    assert ids.tolist()[0][1:] == [tokenizer.vocab.index(w) for w in ("a", "man", "in")] and mask.sum() == 4
    ids, _ = tokenizer(["a man", "the person wears black pants"], max_length=56, padding="longest")
    assert ids.shape == (2, 6)


def test_tokenizer_offline_vocab_and_state_round_trip(tokenizer):
    assert tokenizer.vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert {"walking", "pants", "red"} <= set(tokenizer.vocab)
    pieces = tokenizer.tokenize("zebra")  # unseen word: spelled with character pieces, not [UNK]
    assert pieces[0] == "z" and all(p.startswith("##") for p in pieces[1:])
    assert tokenizer.is_subword[tokenizer.vocab.index("##a")] and not tokenizer.is_subword[tokenizer.cls_id]
    clone = data.Tokenizer.from_state(tokenizer.state())
    text = ["a zebra in black pants"]
    assert torch.equal(clone(text, 10)[0], tokenizer(text, 10)[0])
    assert json.loads(json.dumps(tokenizer.state())) == tokenizer.state()
    assert pickle.loads(pickle.dumps(tokenizer)).vocab == tokenizer.vocab  # spawned DataLoader workers


def test_tokenizer_from_bert_dir(tmp_path, capsys):
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man",
                                                               "walk", "##ing"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = data.Tokenizer.from_bert_dir(str(tmp_path))
    assert (tok.cls_id, tok.mask_id, tok.pad_id) == (101, 103, 0)
    ids, _ = tok(["A man walking"], 6)
    assert ids.tolist() == [[101, 104, 105, 106, 107, 0]]
    expect_exit(capsys, "vocab.txt", data.Tokenizer.from_bert_dir, str(tmp_path / "none"))


# ----------------------------------------------------------------------------------------------------------
# MLM masking (spec §2.4)

def test_masking_never_cls_labels_and_counts(tokenizer):
    ids, _ = tokenizer(["a man in a red shirt walking"] * 64, 56)
    g = torch.Generator().manual_seed(0)
    masked_ids, pos, labels = data.mask_tokens(ids, tokenizer, g)
    assert pos.shape == labels.shape == (64, 10)
    assert (masked_ids[:, 0] == tokenizer.cls_id).all()
    assert ((pos > 0) == (labels != -100)).all() and ((pos > 0).sum(1) == 10).all()  # n_pred = 10 at L = 56
    assert torch.equal(labels, torch.gather(ids, 1, pos).masked_fill(labels == -100, -100))
    assert (labels == 0).any()  # [PAD] positions are candidates, their target is [PAD]
    changed = masked_ids != ids
    assert (changed.sum(1) <= 10).all() and not changed[:, 0].any()


def test_masking_bankers_round_and_max_masks(tokenizer):
    g = torch.Generator().manual_seed(1)
    for length, expected in ((10, 2), (14, 4), (2, 1), (100, 7)):  # round(2.5) = 2, round(3.5) = 4
        ids, _ = tokenizer(["a man"], length)
        _, pos, _ = data.mask_tokens(ids, tokenizer, g, max_masks=7)
        assert (pos > 0).sum().item() == expected and pos.shape == (1, 7)


def test_masking_80_10_10(tokenizer):
    ids, _ = tokenizer(["a man in a red shirt walking the person wears black pants"] * 2000, 56)
    masked_ids, pos, labels = data.mask_tokens(ids, tokenizer, torch.Generator().manual_seed(2))
    chosen = torch.gather(masked_ids, 1, pos)[labels != -100]
    target = labels[labels != -100]
    n = target.numel()
    frac_mask = (chosen == tokenizer.mask_id).float().sum().item() / n
    frac_same = (chosen == target).float().sum().item() / n
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02
    assert abs(1 - frac_mask - frac_same - 0.1) < 0.02


def test_masking_whole_word_expansion():
    tok = data.Tokenizer(data.SPECIAL_TOKENS + ["walk", "##ing", "##s", "x"])
    walk, ing, s, x = (tok.vocab.index(t) for t in ("walk", "##ing", "##s", "x"))
    ids = torch.tensor([[tok.cls_id, walk, ing, s] + [x] * 8])  # L = 12 → n_pred = 3
    whole, split = 0, 0
    for seed in range(200):
        _, pos, _ = data.mask_tokens(ids, tok, torch.Generator().manual_seed(seed), skipgram_prb=0.0)
        whole += set(pos[0].tolist()) - {0} == {1, 2, 3}
        _, pos, _ = data.mask_tokens(ids, tok, torch.Generator().manual_seed(seed), skipgram_prb=0.0,
                                     whole_word=False)
        split += set(pos[0].tolist()) - {0} == {1, 2, 3}
    assert whole > 40 and split < 10  # P(first pick in the word) = 3/11 → ≈ 55 of 200; without: ≈ 1


def test_masking_deterministic_under_seed(tokenizer):
    ids, _ = tokenizer(["a man in a red shirt"] * 8, 20)
    a = data.mask_tokens(ids, tokenizer, torch.Generator().manual_seed(5))
    b = data.mask_tokens(ids, tokenizer, torch.Generator().manual_seed(5))
    c = data.mask_tokens(ids, tokenizer, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[1], c[1])


# ----------------------------------------------------------------------------------------------------------
# transforms (spec §4.6)

def test_transforms_shape_dtype_and_normalisation():
    image = Image.new("RGB", (50, 130), (255, 0, 128))
    for size in ((96, 32), (384, 128)):
        for transform in (data.train_transform(size, "mals"), data.test_transform(size, "cuhk")):
            out = transform(image, random.Random(0))
            assert out.shape == (3, *size) and out.dtype == torch.float32
    mean, std = data.NORMALIZATION["cuhk"]
    assert mean == (0.38901278, 0.3651612, 0.34836376) and std == (0.24344306, 0.23738699, 0.23368555)
    assert set(data.NORMALIZATION) >= {"mals", "cuhk", "icfg", "rstp", "pa100k"}
    out = data.test_transform((24, 8), "cuhk")(image)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(out[:, 5, 3], expected, atol=1e-5)


def test_random_erasing_area_within_bounds():
    erase = data.RandomErasing(p=1.0)
    rng = random.Random(0)
    for _ in range(200):
        out = erase(torch.ones(3, 96, 32), rng)
        zero = out[0] == 0
        area = zero.float().mean().item()
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert 0.01 < area < 0.45  # U(0.02, 0.4) up to the rounding of h and w
        assert zero.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle
        assert (out[:, zero] == 0).all()
    assert torch.equal(data.RandomErasing(p=0.0)(torch.ones(3, 8, 4)), torch.ones(3, 8, 4))


def test_transforms_deterministic_under_seed_and_all_ops():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (120, 40, 3), dtype=np.uint8))
    transform = data.train_transform((96, 32), "mals")
    a, b = transform(image, random.Random(3)), transform(image, random.Random(3))
    assert torch.equal(a, b)
    assert any(not torch.equal(a, transform(image, random.Random(s))) for s in range(4, 8))
    augment = data.RandAugment()
    for op in data.RANDAUG_OPS:
        out = augment.apply(image, op, random.Random(0))
        assert out.size == image.size and out.mode == "RGB"
    bright = np.asarray(augment.apply(Image.new("RGB", (4, 4), (100, 200, 10)), "Brightness"))
    assert bright[0, 0].tolist() == [136, 255, 13]  # ×1.36, clipped


def test_train_transform_without_randaugment_only_flips():
    """randaugment_ops=0 (the tiny preset): a training image is the test image or its mirror, nothing else."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (120, 40, 3), dtype=np.uint8))
    plain = data.test_transform((96, 32), "mals")(image)
    transform = data.train_transform((96, 32), "mals", erasing_p=0.0, randaugment_ops=0)
    outputs = [transform(image, random.Random(seed)) for seed in range(8)]
    assert all(torch.equal(out, plain) or torch.equal(out, plain.flip(-1)) for out in outputs)
    assert any(torch.equal(out, plain.flip(-1)) for out in outputs)


# ----------------------------------------------------------------------------------------------------------
# text preprocessing (spec §4.7)

def test_pre_caption_and_eda():
    assert data.pre_caption("A Man,  in RED!", clean=True) == "a man in red"
    assert data.pre_caption(" ".join(str(i) for i in range(80)), max_words=56).split(" ")[-1] == "55"
    with pytest.raises(ValueError):
        data.pre_caption("!!!", clean=True)
    sentence = "The woman's T-shirt is red, and she carries 2 black backpacks."
    outs = {data.eda(sentence, random.Random(s)) for s in range(40)}
    assert len(outs) > 5
    assert all(set(o) <= set("abcdefghijklmnopqrstuvwxyz ") for o in outs)
    assert data.eda(sentence, random.Random(1)) == data.eda(sentence, random.Random(1))
    assert "crimson" in " ".join(outs) or "lady" in " ".join(outs) or "female" in " ".join(outs)


# ----------------------------------------------------------------------------------------------------------
# the synthetic world

TINY = dict(mals_ids=6, mals_images_per_id=2, train_ids=4, val_ids=2, test_ids=3, images_per_id=2,
            attr_train=4, attr_test=4, image_size=(48, 16))


def test_synthetic_world_deterministic_idempotent_and_readable(tmp_path):
    a = synthetic.make_synthetic(str(tmp_path / "a"), seed=3, **TINY)
    b = synthetic.make_synthetic(str(tmp_path / "b"), seed=3, workers=1, **TINY)  # same world, any process count
    for key in ("cuhk_raw", "attr_test"):
        assert open(a[key]).read() == open(b[key]).read()
    assert open(a["mals_ann"][1]).read() == open(b["mals_ann"][1]).read()
    with open(os.path.join(a["cuhk_root"], "synth", "00001_0.jpg"), "rb") as f1, \
            open(os.path.join(b["cuhk_root"], "synth", "00001_0.jpg"), "rb") as f2:
        assert f1.read() == f2.read()
    stamp = os.path.getmtime(a["info"])
    assert synthetic.make_synthetic(str(tmp_path / "a"), seed=3, **TINY) == a and os.path.getmtime(a["info"]) == stamp
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    mals = data.read_mals(a["mals_ann"], a["mals_root"])
    assert len(mals) == 12 and len({e["pid"] for e in mals}) == 12  # image_id unique per image, as MALS
    assert all(e["label"] == synthetic.label_caption(e["caption"]) for e in mals)
    train = data.read_retrieval("synthetic", a["cuhk_raw"], "train")
    assert len(train) == 4 * 2 * 2 and {e[2] for e in train} == set(range(4))
    test = data.read_retrieval("synthetic", a["cuhk_raw"], "test")
    assert len(test.image_paths) == 6 and len(test.captions) == 12 and sorted(set(test.g_pids)) == [7, 8, 9]
    assert data.load_retrieval("synthetic", str(tmp_path / "a"), "val").g_pids == [5, 5, 6, 6]
    attrs = data.read_attributes(a["attr_test"], split="test")
    assert len(attrs) == 4 and all(set(label) <= {0, 1} and len(label) == 27 for _, label in attrs)
    image = Image.open(attrs[0][0])
    assert image.size == (16, 48)
    c = synthetic.make_synthetic(str(tmp_path / "a"), seed=4, **TINY)  # other settings: regenerated in place
    assert open(c["cuhk_raw"]).read() != open(b["cuhk_raw"]).read()


def test_synthetic_world_never_replaces_what_is_not_a_world(tmp_path, capsys):
    """Only a world of other settings (or an empty folder) is replaced; a user's folder or file given as the
    world's root stays as it was (it was renamed and deleted once the new world was made)."""
    folder, file = tmp_path / "mine", tmp_path / "notes.txt"
    folder.mkdir()
    (folder / "thesis.txt").write_text("keep")
    file.write_text("keep")
    for root in (folder, file):
        with pytest.raises(SystemExit) as error:
            synthetic.make_synthetic(str(root), workers=1, **TINY)
        assert error.value.code == 2 and f"{root} exists and is not a synthetic world" in capsys.readouterr().err
    assert (folder / "thesis.txt").read_text() == "keep" and file.read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["mine", "notes.txt"]  # nothing half-made beside them
    (tmp_path / "empty").mkdir()
    assert os.path.isfile(synthetic.make_synthetic(str(tmp_path / "empty"), workers=1, **TINY)["info"])


def test_synthetic_world_interrupted_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C while the images render: no world and no half-made temporary folder stay behind (one was left,
    up to the world's 216 MB)."""
    real, rendered = synthetic._render_job, []

    def interrupt_at_the_third(job):
        if len(rendered) == 2:
            raise KeyboardInterrupt
        rendered.append(job)
        return real(job)

    monkeypatch.setattr(synthetic, "_render_job", interrupt_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_synthetic(str(tmp_path / "world"), workers=1, **TINY)
    assert os.listdir(tmp_path) == []


def test_synthetic_labels_follow_caption_words():
    rng = np.random.default_rng(0)
    silent = 0
    for _ in range(400):
        identity = synthetic.sample_identity(rng)
        caption = synthetic.make_caption(identity, rng)
        label, truth = synthetic.label_caption(caption), synthetic.identity_label(identity)
        assert all(l == -1 or l == t for l, t in zip(label, truth)), (caption, label, truth)
        words = set(caption.lower().replace(".", " ").replace(",", " ").split())
        if not words & {"hat", "cap", "beanie"}:
            assert label[3] == -1
            silent += 1
        assert sum(v != -1 for v in label) >= 1
    assert silent > 100
    upper = [synthetic.sample_identity(rng)["upper"] for _ in range(100)]
    assert max(upper.count(c) for c in synthetic.UPPER_COLOURS) >= 10  # identities share colours
    # polarity (spec §3.1): README example "a young boy … jeans and a baseball cap" → [1, 0, …, 1, 1]
    label = synthetic.label_caption("a young boy wearing a black hoodie leaning against a wall with his hands on his "
                               "hips and his hands on his hips wearing jeans and a baseball cap")  # MALS README
    assert label[:2] == [1, 0] and label[3] == 0 and label[7:10] == [0, 0, 1] and label[-2:] == [1, 1]
    assert label[10] == 0 and label[11:18] == [1] * 7 and label[22] == 0  # black upper; jeans → blue lower
    label = synthetic.label_caption("A woman in a red t-shirt, without a hat, carries nothing.")
    assert label[0] == 0 and label[3:8] == [1, 1, 1, 1, 1] and label[12] == 0 and label[10] == 1
    assert synthetic.label_caption("Her black hair and black shoes.")[10:] == [-1] * 17


# ----------------------------------------------------------------------------------------------------------
# torch Datasets

def test_datasets_items_and_worker_randomness(tmp_path, tokenizer):
    write_image(tmp_path / "a.jpg", size=(16, 48))
    entries = [{"image": str(tmp_path / "a.jpg"), "caption": "a man in a red shirt", "pid": 0, "label": LABEL27}] * 8
    transform = data.train_transform((48, 16), "mals")
    pre = data.PretrainDataset(entries, transform, tokenizer, max_tokens=20, seed=1)
    item = pre[0]
    assert item["image"].shape == (3, 48, 16) and item["input_ids"].shape == (20,)
    assert item["masked_pos"].shape == item["masked_labels"].shape == (10,) and item["attr_label"].tolist() == LABEL27
    assert item["pid"].dtype == torch.long
    loader = torch.utils.data.DataLoader(pre, batch_size=4, num_workers=2)
    batches = list(loader)
    assert batches[0]["masked_pos"].shape == (4, 10)
    assert not torch.equal(batches[0]["masked_pos"], batches[1]["masked_pos"])  # workers differ
    fine = data.FinetuneDataset([(e["image"], e["caption"], e["pid"]) for e in entries], transform, tokenizer,
                                max_tokens=20)
    item = fine[0]
    assert item["eda_input_ids"].shape == (20,) and item["eda_input_ids"][0] == tokenizer.cls_id
    images = data.ImageDataset([str(tmp_path / "a.jpg")] * 3, data.test_transform((48, 16), "cuhk"))
    assert images[2]["index"] == 2 and images[2]["image"].shape == (3, 48, 16)


# =====================================================================================================================
# evaluate.py
# =====================================================================================================================


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
    model.APTM; the [CLS] output of encode_cross sees every unpadded text token; cross_kv is a per-layer
    (key, value) cache (one layer here)."""

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
    model = FakeModel().eval()
    text_embeds, text_atts, text_feat, image_embeds, image_feat = encoded_problem(model)
    topk_idx = (text_feat @ image_feat.t()).topk(6, dim=1).indices  # (Q, k)
    itm = evaluate.itm_rerank(model, text_embeds, text_atts, image_embeds, topk_idx, pair_batch=10,
                              progress=False)
    with torch.no_grad():  # the released loop: one query, its k images, full padded length
        expected = torch.stack([model.itm_logits(text_embeds[i].repeat(6, 1, 1), text_atts[i].repeat(6, 1),
                                                 image_embeds[topk_idx[i]])[:, 1] for i in range(len(topk_idx))])
    torch.testing.assert_close(itm, expected)


@pytest.mark.parametrize("fusion", evaluate.FUSION_MODES)
def test_rank_gallery_independent_of_query_chunks(fusion):
    torch.manual_seed(0)
    model = FakeModel().eval()
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
    model = FakeModel().eval()
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
    paths = synthetic.make_synthetic(str(root / "world"), mals_ids=2, mals_images_per_id=1, train_ids=2, val_ids=2,
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
    model = FakeModel(vocab=world_and_ckpt["tokenizer"].vocab_size)
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
                   "--query-index", "0", "--top", "3", "--workers", "0", "--out", str(png)])
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
    (["--workers", "-1"], "--workers ≥ 0"),
    (["--num-workers", "-1"], "--workers ≥ 0"),  # the older spelling of the same option
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


# -----------------------------------------------------------------------------
# The attribute oracle (a no-learning reference, ours)

def test_attribute_oracle_scores_match_naive_loop():
    """agree − contradict per (query, gallery image), the identity's labels being the union of its captions'."""
    testset = data.TestSet(image_paths=["a", "b", "c"], g_pids=[7, 8, 7],
                           captions=["q0", "q1", "q2"], q_pids=[7, 8, 8])
    table = {"q0": [1, 0, -1], "q1": [1, 1, -1], "q2": [-1, 0, 0]}
    scores = evaluate.attribute_oracle_scores(testset, label_fn=table.get)
    stated = {pid: set() for pid in (7, 8)}  # (attribute, value) pairs any caption of the identity states
    for caption, pid in zip(testset.captions, testset.q_pids):
        stated[pid] |= {(k, v) for k, v in enumerate(table[caption]) if v != -1}
    for q, caption in enumerate(testset.captions):
        for g, pid in enumerate(testset.g_pids):
            expected = 0
            for k, v in enumerate(table[caption]):
                if v != -1:
                    expected += ((k, v) in stated[pid]) - ((k, 1 - v) in stated[pid])
            assert scores[q, g].item() == expected
    # identity 8 says attribute 1 is both 1 and 0: q0 (value 0) agrees once and contradicts once there
    assert scores[0, 1].item() == 1 + 0 - 0 + 0


def test_attribute_oracle_ties_count_at_their_expected_value():
    """Every image tied: R1 is the share of right images, whatever the tie orders drawn."""
    testset = data.TestSet(image_paths=["a", "b", "c", "d"], g_pids=[1, 2, 3, 4], captions=["x"], q_pids=[1])
    metrics = evaluate.attribute_oracle(testset, label_fn=lambda caption: [-1, -1], tie_orders=400)
    assert metrics["R1"] == pytest.approx(25.0, abs=5.0)


def test_main_oracle_needs_no_checkpoint(world_and_ckpt, capsys):
    result = evaluate.main(["--oracle", "--dataset", "cuhk", "--data-root", world_and_ckpt["cuhk"]])
    assert result["fusion"] == "oracle" and 0 <= result["R1"] <= 100
    assert "oracle" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--oracle", "--ckpt", world_and_ckpt["ckpt"]])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    assert exit_info.value.code == 2


# =====================================================================================================================
# pretrain.py, finetune.py, attributes.py (training, resume, DDP, the whole chain)
# =====================================================================================================================


TINY_WORLD = dict(mals_ids=40, mals_images_per_id=2, train_ids=12, val_ids=4, test_ids=4, images_per_id=2,
                  attr_train=16, attr_test=16, image_size=(96, 32))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world") / "synthetic")
    synthetic.make_synthetic(root, workers=1, **TINY_WORLD)
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


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from more threads; on a busy CPU OpenMP spin-waits cost ~50x (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_split_and_resume(main, world, tmp_path, steps, *extra):
    """main() for `steps` steps in one go (out a/) and for steps/2 + --resume + steps/2 (out b/) -> both checkpoints."""
    main(run_args(world, tmp_path / "a", "--max-steps", str(steps), *extra))
    main(run_args(world, tmp_path / "b", "--max-steps", str(steps // 2), *extra))
    main(["--resume", str(tmp_path / "b" / "ckpt.pt"), "--max-steps", str(steps)])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == steps
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_pretrain_smoke_and_exact_resume(world, tmp_path, one_thread):
    """N steps in one go equal N/2 steps + --resume + N/2 steps, weight for weight (DESIGN §6). One thread: with
    two, some CPU kernels sum in a varying order and two identical runs already differ in the last bits (measured)."""
    run_split_and_resume(pretrain.main, world, tmp_path, 4)
    log = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and all(key in log[-1] for key in ("itc", "itm", "mlm", "iac", "iam", "mam", "total"))


def test_finetune_exact_resume(world, tmp_path, one_thread):
    """finetune.py writes its own loop: there too N steps in one go equal N/2 steps + --resume + N/2 steps."""
    run_split_and_resume(finetune.main, world, tmp_path, 2, "--k-rerank", "4")


@pytest.mark.parametrize("script, extra", [(pretrain, ["--val-dataset", "none"]), (finetune, ["--k-rerank", "4"])])
def test_stop_signal_checkpoints_then_resume_ends_as_a_straight_run(world, tmp_path, monkeypatch, one_thread,
                                                                    script, extra):
    """Ctrl-C (SIGINT) mid-run: the step in flight finishes, ckpt.pt is written and main stops with status 130
    (no test evaluation); --resume then ends where a straight run ends, weight for weight (DESIGN §6), and its
    log.jsonl reads as the straight run's (records a killed run wrote after the checkpoint dropped)."""
    script.main(run_args(world, tmp_path / "a", "--max-steps", "5", *extra))
    real, handler = script.get_lr, signal.getsignal(signal.SIGINT)

    def interrupt_at_step_2(step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, *args)

    monkeypatch.setattr(script, "get_lr", interrupt_at_step_2)
    with pytest.raises(SystemExit) as stopped:
        script.main(run_args(world, tmp_path / "b", "--max-steps", "5", *extra))
    assert stopped.value.code == 130 and signal.getsignal(signal.SIGINT) is handler
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    assert not (tmp_path / "b" / "results.json").exists()
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # as if killed later: a record past the checkpoint, cut short
        f.write('{"step": 4, "total": 1.0}\n{"step": 5, "to')
    monkeypatch.setattr(script, "get_lr", real)
    script.main(["--resume", str(tmp_path / "b" / "ckpt.pt"), "--max-steps", "5"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(value, b[key]) for key, value in a.items())
    logs = [[{k: v for k, v in json.loads(line).items() if k != "pairs_per_s"}
             for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("a", "b")]
    assert logs[0] == logs[1] and [record["step"] for record in logs[1]] == [1, 2, 3, 4, 5]  # one run's log


def test_stop_signal_leaves_an_ignored_signal_ignored():
    """A run started with SIGINT ignored (`python pretrain.py &` in a script) keeps it ignored, as Python does;
    SIGTERM is caught, and restore() gives both back."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        stop = pretrain.StopOnSignal()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == stop.note
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) is before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_resume_refuses_the_other_scripts_checkpoint(tmp_path, capsys):
    """--resume continues only a run of the same script (the optimizer groups differ: load_state_dict raised
    mid-set-up) and only a checkpoint with training state (not an official or weights-only one)."""
    made = {"pretrain": vars(pretrain.get_args([])), "finetune": vars(finetune.get_args([]))}
    for writer, settings in made.items():
        torch.save(dict(args=settings, optimizer={}), tmp_path / f"{writer}.pt")
    torch.save(dict(model={}, config={}), tmp_path / "weights.pt")
    for script, other in ((pretrain, "finetune"), (finetune, "pretrain")):
        name = script.__name__
        args, _ = script.resume_settings(script.get_args(["--resume", str(tmp_path / f"{name}.pt")]), name)
        assert args.resume == str(tmp_path / f"{name}.pt")
        for path, message in ((tmp_path / f"{other}.pt", f"is a {other}.py checkpoint: resume it with {other}.py"),
                              (tmp_path / "weights.pt", "no training state to resume")):
            with pytest.raises(SystemExit) as error:
                script.resume_settings(script.get_args(["--resume", str(path)]), name)
            assert error.value.code == 2 and message in capsys.readouterr().err


def test_uniform_negatives_for_the_first_part_of_the_run(world, tmp_path, monkeypatch):
    """--uniform-negatives 0.5: ITM negatives are uniform for the first half of the steps, hard after."""
    seen = []
    real = pretrain.sample_hard_negatives
    monkeypatch.setattr(pretrain, "sample_hard_negatives", lambda *args: seen.append(args[5]) or real(*args))
    pretrain.main(run_args(world, tmp_path, "--epochs", "2", "--uniform-negatives", "0.5", "--val-dataset", "none"))
    assert len(seen) >= 4 and seen == [step < len(seen) / 2 for step in range(len(seen))]


def test_finetune_and_evaluate_from_pretrained(world, tmp_path, capsys):
    """pretrain → finetune --init → evaluate --ckpt → attributes --ckpt → finetune --dataset synthetic-attr: the
    whole chain on CPU."""
    pretrain.main(run_args(world, tmp_path / "pre", "--epochs", "1", "--val-dataset", "none"))
    init = str(tmp_path / "pre" / "ckpt.pt")
    finetune.main(run_args(world, tmp_path / "ft", "--init", init, "--epochs", "2", "--k-rerank", "4"))
    out = capsys.readouterr().out
    assert "val_R1" in out and "test with" in out
    paths = synthetic.synthetic_world(world)  # the training split and every MALS-style image (tiny's --replay)
    samples = len(data.load_retrieval("synthetic", paths["cuhk_raw"], "train")) + len(
        data.read_mals(paths["mals_ann"], paths["mals_root"]))
    assert f" {samples:,} samples" in out
    assert (tmp_path / "ft" / "best.pt").exists()
    # the best validation R1 so far travels in the checkpoint, so a resumed run selects against it
    logged = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    best_r1 = max(record["val_R1"] for record in logged if "val_R1" in record)
    assert torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)["best"] == best_r1
    metrics = attributes.main(["--ckpt", init, "--data-root", world])
    assert set(metrics) == {"mA", "Acc", "Prec", "Rec", "F1", "AUC"}
    tuned = finetune.main(run_args(world, tmp_path / "attr", "--dataset", "synthetic-attr", "--init", init,
                                   "--max-steps", "2"))  # E13 fine-tuning, then the test split
    assert set(tuned) == set(metrics) and (tmp_path / "attr" / "ckpt.pt").exists()
    image = data.read_attributes(synthetic.synthetic_world(world)["attr_test"])[0][0]
    assert attributes.main(["--ckpt", init, "--image", image]).shape == (27,)


def test_finetune_replay_mixes_in_pretraining_images(world, tmp_path):
    """The tiny preset's --replay N: the first N MALS-style images join the synthetic training split, each its own
    identity after the split's; the paper's preset and the other datasets have none, and refuse it."""
    paths = synthetic.synthetic_world(world)
    train = data.load_retrieval("synthetic", paths["cuhk_raw"], "train")
    mals = data.read_mals(paths["mals_ann"], paths["mals_root"])[:5]
    replayed = finetune.replay_entries(train, paths, 5)
    first = 1 + max(pid for _, _, pid in train)
    assert replayed == [(m["image"], m["caption"], first + i) for i, m in enumerate(mals)]
    assert finetune.get_args([]).replay == 6000 and finetune.get_args(["--preset", "aptm-base"]).replay == 0
    assert finetune.get_args(["--dataset", "cuhk", "--data-root", "x"]).replay == 0
    with pytest.raises(SystemExit) as error:
        finetune.get_args(["--dataset", "cuhk", "--data-root", "x", "--replay", "5"])
    assert error.value.code == 2


@pytest.mark.parametrize("get_args, extra, message", [
    (pretrain.get_args, ["--max-steps", "0"], "--max-steps must be at least 1"),  # it wrote no checkpoint, said one
    (pretrain.get_args, ["--log-every", "0"], "--log-every must be at least 1"),  # ZeroDivisionError in the loop
    (pretrain.get_args, ["--workers", "-1"], "--workers must be at least 0"),  # the DataLoader's ValueError
    (pretrain.get_args, ["--lr", "nan"], "--lr must be at least 0"),  # AdamW's ValueError
    (pretrain.get_args, ["--warmup-steps", "-5"], "--warmup-steps must be at least 0"),
    (pretrain.get_args, ["--label-smoothing", "1"], "--label-smoothing must be ε in [0, 1)"),
    (pretrain.get_args, ["--uniform-negatives", "1.5"], "--uniform-negatives must be a fraction in [0, 1]"),
    (finetune.get_args, ["--k-rerank", "0"], "--k-rerank must be at least 1"),  # torch.amin's IndexError at validation
    (finetune.get_args, ["--erasing-p", "2"], "--erasing-p must be a fraction in [0, 1]"),
    (finetune.get_args, ["--dataset", "synthetic-attr", "--eda-weight", "-1"], "--eda-weight must be at least 0"),
    (attributes.get_args, ["--ckpt", "x.pt", "--batch-size", "0"], "--batch-size must be at least 1"),
    (attributes.get_args, ["--ckpt", "x.pt", "--workers", "-1"], "--workers at least 0"),
])
def test_training_scripts_refuse_bad_numbers(capsys, get_args, extra, message):
    """A setting out of its range stops at the command line with exit 2 and its name, not in the run."""
    with pytest.raises(SystemExit) as error:
        get_args(extra)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_loader_workers_follow_the_device():
    """One rule for every script's data-loader processes when the command names none: 0 on a CPU (they would take
    the model's cores), 6 on a GPU; a number given on the command line is kept."""
    for device, workers in (("cpu", 0), ("cuda", 6), ("cuda:1", 6)):
        assert data.default_workers(device) == workers
        assert pretrain.get_args(["--device", device]).workers == workers
        assert finetune.get_args(["--device", device]).workers == workers
    assert pretrain.get_args(["--device", "cuda", "--workers", "0"]).workers == 0
    assert finetune.get_args(["--workers", "3"]).workers == 3


def test_validation_loads_images_with_the_given_workers(world, tmp_path, monkeypatch):
    """--workers reaches the retrieval evaluation of both training scripts, not only their training loader."""
    seen = []

    def record(*args, num_workers=None, **kwargs):
        seen.append(num_workers)
        return dict.fromkeys(("R1", "R5", "R10", "mAP", "mINP"), 0.0)

    monkeypatch.setattr(pretrain, "evaluate_retrieval", record)
    monkeypatch.setattr(finetune, "evaluate_retrieval", record)
    pretrain.main(run_args(world, tmp_path, "--epochs", "1", "--workers", "1"))  # validation after the epoch
    args = finetune.get_args(["--data-dir", world, "--workers", "3"])
    finetune.evaluate_split(args, None, None, None, "cpu")
    assert seen == [1, 3]


def test_finetune_from_random_init_and_bad_init(world, tmp_path, capsys):
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "best.pt").write_text("an earlier run's")  # no epoch ends in 2 steps: the test takes ckpt.pt
    finetune.main(run_args(world, tmp_path / "ft", "--max-steps", "2"))
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["checkpoint"] == str(tmp_path / "ft" / "ckpt.pt")
    with pytest.raises(SystemExit) as error:
        finetune.main(run_args(world, tmp_path / "ft2", "--init", str(tmp_path / "missing.pt")))
    assert error.value.code == 2 and "missing.pt" in capsys.readouterr().err


DDP_ITC_SCRIPT = """
import sys, torch, torch.distributed as dist
import losses, pretrain
rank, init_file, inputs, result = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
image_feat, text_feat, pid = torch.load(inputs)
local = slice(rank * 4, (rank + 1) * 4)
v, t = image_feat[local].clone().requires_grad_(True), text_feat[local].clone().requires_grad_(True)
loss = losses.itc_loss(pretrain.gather(v), pretrain.gather(t), pretrain.gather(pid[local]), torch.tensor(0.07))
loss.backward()
torch.save(dict(loss=loss.detach(), v_grad=v.grad, t_grad=t.grad), result)
dist.destroy_process_group()
"""


def test_ddp_gathered_itc_equals_one_process(tmp_path):
    """ITC over features gathered from 2 gloo processes equals ITC on the concatenated batch, and each process's
    feature gradient, once DDP has averaged it over the 2 ranks, equals its slice of the one-process gradient."""
    generator = torch.Generator().manual_seed(0)
    image_feat, text_feat = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    pid = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5])
    torch.save((image_feat, text_feat, pid), tmp_path / "inputs.pt")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": here}
    ranks = [subprocess.Popen([sys.executable, "-c", DDP_ITC_SCRIPT, str(rank), str(tmp_path / "init"),
                               str(tmp_path / "inputs.pt"), str(tmp_path / f"{rank}.pt")], env=env, cwd=here)
             for rank in range(2)]
    assert [process.wait(timeout=300) for process in ranks] == [0, 0]
    v, t = image_feat.clone().requires_grad_(True), text_feat.clone().requires_grad_(True)
    loss = losses.itc_loss(v, t, pid, torch.tensor(0.07))
    loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(result["loss"], loss.detach(), atol=1e-6)
        assert torch.allclose(result["v_grad"] / 2, v.grad[rank * 4:(rank + 1) * 4], atol=1e-6)
        assert torch.allclose(result["t_grad"] / 2, t.grad[rank * 4:(rank + 1) * 4], atol=1e-6)


def test_torchrun_two_processes_pretrain(world, tmp_path):
    """`torchrun --nproc_per_node 2 pretrain.py` runs a few DDP steps on CPU (gloo)."""
    import socket
    with socket.socket() as probe:  # a free port: a fixed one collides with any other run on the machine
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "pretrain.py", *run_args(world, tmp_path, "--max-steps", "2", "--val-dataset", "none",
                                        "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 x cpu" in done.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2


# =====================================================================================================================
# bench.py
# =====================================================================================================================


def test_smoke_run_gives_finite_numbers(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--modes", "fp32", "--steps", "1", "--warmup", "0", "--json", str(out), "--no-checks",
            "--pipeline-workers", "0", "--pipeline-batches", "1"]
    result = bench.main(argv)
    assert json.loads(out.read_text())["training"].keys() == {"finetune", "pretrain"}
    for modes in result["training"].values():
        assert set(modes) == {"fp32"}
        for row in modes.values():
            for key in ("ms_per_step", "pairs_per_s", "tflops_per_step", "achieved_tflops", "loss"):
                assert math.isfinite(row[key]) and row[key] > 0, (key, row)
            assert row["mfu"] is None and row["peak_memory_gb"] is None  # CPU: no peak, no memory counter
    evaluation = result["evaluation"]
    for key in ("time_features", "time_itm", "time_total", "R1", "mAP"):
        assert math.isfinite(evaluation[key]), (key, evaluation)


def test_flop_counter_by_hand():
    # one BERT layer, width 4, FFN 8, on 3 tokens: qkv 3·4·12 + QKᵀ/AV 2·3·3·4 + out 3·4·4 + FFN 3·4·8 + 3·8·4
    config = replace(M.CONFIGS["tiny"], hidden_size=4, intermediate_size=8, num_text_layers=1)
    assert bench.text_macs(config, 3) == 144 + 72 + 48 + 96 + 96
    assert bench.linear_macs(5, 7, 11) == 385
    # spec §1.6: Swin-B@384×128 ≈ 15.2 GMACs, text encoder (L=56) ≈ 2.4, cross encoder per pair ≈ 3.3
    base = M.CONFIGS["aptm-base"]
    assert round(bench.swin_macs(base) / 1e9, 1) == 15.2
    assert round(bench.text_macs(base, 56) / 1e9, 1) == 2.4
    assert round(bench.cross_macs(base, 56) / 1e9, 1) == 3.3
    assert bench.image_tokens(base) == 49
    # ITM and MLM compute the last fusion layer at q positions only. One fusion layer, width 4, FFN 8, 3 tokens,
    # N = 13 image tokens (keys/values given): self-attention keys/values 3·4·8, then per query row 4·4 (query)
    # + 2·3·4 (QKᵀ, AV) + 4·4 (out) + 4·4 + 2·13·4 + 4·4 (cross: query, attention, out) + 4·8 + 8·4 (FFN)
    config = replace(config, num_cross_layers=1)
    assert [bench.pair_macs(config, 3, q) for q in (None, 3, 1)] == [96 + 256 * 3, 96 + 256 * 3, 96 + 256]


# =====================================================================================================================
# issue 15: sync-free step
# =====================================================================================================================


def tiny_step(objective_name, batch_size=6, config=None):
    """(model, objective, batch, generator) for one tiny-preset step on bench's random batch."""
    tokenizer = bench.bench_tokenizer(bench.TINY_VOCAB_SIZE)
    config = config or replace(CONFIGS["tiny"], vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = APTM(config).train()
    objective = bench.build_objective(objective_name, model, tokenizer, torch.device("cpu"))
    batch = bench.random_batch(objective_name, config, tokenizer, batch_size, torch.device("cpu"), seed=0)
    return model, objective, batch, torch.Generator().manual_seed(0)


def test_sync_counter_sees_sync_ops_forward_and_backward():
    """The counter is not vacuous: multinomial, nonzero, boolean-mask indexing and .item() are counted."""
    x = torch.rand(4, 3, requires_grad=True)
    with bench.SyncCounter() as syncs:
        torch.multinomial(x.detach(), 1)
        (x > 0.5).nonzero()
        y = x[x.detach() > 0.5].sum() + x.sum()
        y.item()
        before = syncs.ops
        y.backward()
    assert syncs.ops > before  # the backward runs under the mode too
    assert {"multinomial", "nonzero", "index", "_local_scalar_dense"} <= set(syncs.counts)


@pytest.mark.parametrize("objective_name", ["pretrain", "finetune"])
def test_training_step_has_no_sync_forcing_op(objective_name, one_thread):
    """Draws, forward, losses and backward of one tiny step: 0 ops that would make the host wait for a GPU."""
    model, objective, batch, generator = tiny_step(objective_name)
    assert bench.count_step_syncs(objective, batch, generator) == {}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("objective_name", ["pretrain", "finetune"])
def test_objective_losses_compile_as_one_graph(objective_name, one_thread):
    """torch.compile(objective.losses, fullgraph=True) (eager backend: dynamo's tracing) succeeds."""
    _, objective, batch, generator = tiny_step(objective_name)
    compiled, detail = bench.compile_check(objective, batch, generator)
    assert compiled, detail


def test_categorical_sampler_draws_the_exact_distribution():
    """Exponential race vs the exact probabilities w / Σw: a chi-square statistic over 20,000 seeded draws per row
    stays below the 0.9999 quantile (so the test is not flaky), and zero weights are never drawn."""
    weights = torch.tensor([[0.5, 0.0, 0.25, 0.125, 0.125, 0.0],
                            [1e-5, 1e-5, 0.9, 0.1, 0.0, 1e-5],
                            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    draws = 20000
    noise = losses.categorical_noise((draws, *weights.shape), torch.Generator().manual_seed(0))  # (N, R, C)
    picks = losses.sample_categorical(weights.expand(draws, -1, -1), noise)  # (N, R)
    counts = F.one_hot(picks, weights.shape[1]).sum(0).double()  # (R, C)
    expected = draws * weights.double() / weights.double().sum(1, keepdim=True)
    assert (counts[weights == 0] == 0).all()
    chi2_9999 = {2: 18.42, 3: 21.11, 5: 25.74}  # quantiles of the chi-square distribution, df = nonzero classes - 1
    for row in range(weights.shape[0]):
        seen = weights[row] > 0
        big = expected[row] >= 5  # pool the rare classes (expected < 5) into one cell, as the test requires
        observed = torch.cat([counts[row][big & seen], counts[row][~big & seen].sum()[None]])
        wanted = torch.cat([expected[row][big & seen], expected[row][~big & seen].sum()[None]])
        keep = wanted > 0
        chi2 = ((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum()
        assert chi2 < chi2_9999[int(keep.sum()) - 1], (row, float(chi2))


def test_hard_negatives_from_predrawn_noise_equal_the_generator_path():
    """sample_hard_negatives with a Generator = with categorical_noise drawn from the same generator first."""
    feat_i, feat_t, pid = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 0, 1, 2, 3])
    a = losses.sample_hard_negatives(feat_i, feat_t, pid, 0.07, torch.Generator().manual_seed(4))
    noise = losses.categorical_noise((2, 5, 5), torch.Generator().manual_seed(4))
    b = losses.sample_hard_negatives(feat_i, feat_t, pid, 0.07, noise)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def previous_pretrain_terms(model, objective, batch, draws, uniform):
    """The pre-training objective as the code computed it before issue 15: every pair projects its image's
    cross-attention keys/values itself, MAM runs only the prompts with a true image (nonzero), IAM one
    cross-encoder call per prompt; random choices taken from `draws`."""
    images = data.device_images(batch["image"], batch["erase"], batch["norm"])
    image_embeds = model.encode_image(images)
    image_feat = model.image_feat(image_embeds)
    ids, atts, pid = batch["input_ids"], batch["attention_mask"], batch["pid"]
    text_embeds = model.encode_text(ids, atts)
    itc = losses.itc_loss(image_feat, model.text_feat(text_embeds), pid, model.temp)
    neg_image, neg_text = losses.sample_hard_negatives(image_feat, model.text_feat(text_embeds), pid, model.temp,
                                                       draws["negatives"], uniform)
    logits = model.itm_logits(torch.cat([text_embeds, text_embeds, text_embeds[neg_text]]),
                              torch.cat([atts, atts, atts[neg_text]]),
                              torch.cat([image_embeds, image_embeds[neg_image], image_embeds]))
    itm = losses.itm_loss(logits, torch.cat([torch.ones_like(pid), torch.zeros_like(pid), torch.zeros_like(pid)]))
    mlm = losses.mlm_loss(model.mlm_logits(batch["masked_ids"], atts, image_embeds, batch["masked_pos"]),
                          batch["masked_labels"])
    stream = objective.prompts
    P, eps = stream.prompt_ids.shape[0], stream.label_smoothing
    masked_ids, masked_pos, masked_labels = (data.join_prompt_rows(batch[k], P) for k in data.PROMPT_MASK_KEYS)
    prompt_embeds = model.encode_text(stream.prompt_ids, stream.prompt_atts)
    iac = losses.iac_loss(image_feat, model.text_feat(prompt_embeds), batch["attr_label"], model.temp, eps)
    chosen, image_idx, has_true = draws["attributes"]
    m = attributes.prompt_targets(batch["attr_label"])
    B = pid.shape[0]
    iam = sum(losses.smoothed_cross_entropy(model.itm_logits(prompt_embeds[t].repeat(B, 1, 1),
                                                             stream.prompt_atts[t].repeat(B, 1), image_embeds),
                                            m[:, t], eps) for t in chosen.tolist()) / len(chosen)
    kept = has_true.nonzero().squeeze(1)
    mam = losses.mam_loss(model.mlm_logits(masked_ids[kept], stream.prompt_atts[kept], image_embeds[image_idx[kept]],
                                           masked_pos[kept]), masked_labels[kept])
    return losses.pretrain_objective(itc, itm, mlm, iac, iam, mam, objective.beta)


def test_pretrain_losses_and_gradients_equal_the_previous_computation(one_thread):
    """K/V projected once per image, MAM at a fixed shape, images normalised on the device: every term and every
    gradient equal the previous code's on a fixed batch and fixed draws (≤ 1e-5)."""
    model, objective, batch, generator = tiny_step("pretrain", batch_size=6)
    objective.prompts.label_smoothing = 0.4
    batch["attr_label"][:, 0] = -1  # prompts 0 and 1 have no true image: MAM keeps them at weight zero
    draws = objective.draw(batch, generator, 0.0)
    assert not draws[0]["attributes"][2][:2].any() and draws[0]["attributes"][2].any()
    params = [p for p in model.parameters() if p.requires_grad]
    new = objective.losses(batch, *draws)
    old = previous_pretrain_terms(model, objective, batch, *draws)
    for key in old:
        torch.testing.assert_close(new[key], old[key], atol=1e-5, rtol=1e-5, msg=key)
    new_grads = torch.autograd.grad(new["total"], params, allow_unused=True)
    old_grads = torch.autograd.grad(old["total"], params, allow_unused=True)
    for p, a, b in zip(params, new_grads, old_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients(one_thread):
    """APTM.checkpointing on: the same loss and gradients (≤ 1e-5), with dropout and drop-path drawing at random
    (checkpointing replays the random state when it recomputes)."""
    tokenizer = bench.bench_tokenizer(bench.TINY_VOCAB_SIZE)
    config = replace(CONFIGS["tiny"], vocab_size=tokenizer.vocab_size, drop_path_rate=0.2, hidden_dropout=0.1,
                     attention_dropout=0.1)
    model, objective, batch, _ = tiny_step("pretrain", config=config)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        torch.manual_seed(1)
        total = objective(batch, torch.Generator().manual_seed(0), 0.0)["total"]
        results.append((total, torch.autograd.grad(total, params, allow_unused=True)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=0)
    for a, b in zip(grads_a, grads_b):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_device_images_equal_the_float_transform():
    """uint8 + erasing rectangle through the loader, normalised and erased on the device = the previous all-float
    transform: normalise in numpy, then erase with the same random numbers."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 40, 3), dtype=np.uint8))
    transform = data.train_transform((96, 32), "mals", erasing_p=0.6)
    mean, std = (np.asarray(v, dtype=np.float32) for v in data.NORMALIZATION["mals"])
    erased = 0
    for seed in range(12):
        sample = transform.for_device(image, random.Random(seed))
        assert sample["image"].dtype == torch.uint8
        got = data.device_images(sample["image"][None], sample["erase"][None], sample["norm"][None])[0]
        rng = random.Random(seed)  # the previous transform: flip, RandAugment, float normalisation, erasing
        pil = image.resize((32, 96), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(transform.randaugment(pil, rng), dtype=np.uint8).astype(np.float32)
        array = np.ascontiguousarray((array * (1 / (255 * std)) - mean / std).transpose(2, 0, 1))
        expected = torch.from_numpy(data.RandomErasing(0.6)(array, rng))
        assert torch.equal(got, expected), seed
        assert torch.equal(transform(image, random.Random(seed)), expected)
        erased += int(sample["erase"][2] > 0)
    assert 0 < erased < 12


def test_prompt_masking_drawn_in_workers_and_reproducible(tmp_path, tokenizer):
    """Each batch carries one masking of all prompts, split over its samples; the same with 0 or 2 workers and
    after set_epoch back (exact resume); a new one for another batch."""
    write_image(tmp_path / "a.jpg", size=(16, 48))
    prompts = ("the person is a woman", "the person is a man", "the person with a hat", "the person without a hat",
               "the person wears red", "the person wears blue")
    masking = data.PromptMasking(tokenizer, prompts, 20)
    entries = [{"image": str(tmp_path / "a.jpg"), "caption": "a man in a red shirt", "pid": i, "label": LABEL27}
               for i in range(8)]
    dataset = data.PretrainDataset(entries, data.train_transform((48, 16), "mals"), tokenizer, max_tokens=20, seed=3,
                                   prompt_masking=masking)

    def batches(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers)
        return [[data.join_prompt_rows(batch[k], len(prompts)) for k in data.PROMPT_MASK_KEYS] for batch in loader]

    first, again = batches(0), batches(2)
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))
    masked_ids, masked_pos, masked_labels = first[0]
    assert masked_ids.shape == masking.prompt_ids.shape and masked_pos.shape == (len(prompts), 10)
    changed = masked_ids != masking.prompt_ids
    assert (changed.sum(1) <= (masked_labels != -100).sum(1)).all() and not changed[:, 0].any()
    assert not torch.equal(first[0][1], first[1][1])  # each batch its own masking
    rows = torch.arange(14).view(7, 2)
    assert torch.equal(data.join_prompt_rows(data.split_prompt_rows(rows, 3), 7), rows)


def test_non_finite_watch_stops_naming_the_first_bad_step_and_its_terms(capsys):
    """The loop's check stays on the device (no sync-forcing op in update) and still stops the run, naming the first
    step whose loss was not finite and that step's terms."""
    watch = pretrain.NonFiniteWatch(torch.device("cpu"))
    steps = [dict(itc=torch.tensor(1.0), total=torch.tensor(2.0)),
             dict(itc=torch.tensor(float("nan")), total=torch.tensor(float("nan"))),
             dict(itc=torch.tensor(float("inf")), total=torch.tensor(float("inf")))]
    with bench.SyncCounter() as syncs:
        for step, terms in enumerate(steps):
            watch.update(step, terms)
    assert syncs.counts == {}
    with pytest.raises(SystemExit) as exit_info:
        watch.check()
    assert exit_info.value.code == 2
    assert "non-finite loss at step 1: {'itc': nan, 'total': nan}" in capsys.readouterr().err
    fine = pretrain.NonFiniteWatch(torch.device("cpu"))
    fine.update(0, steps[0])
    fine.check()


def test_run_loader_persistent_workers_follow_the_epoch(tmp_path, tokenizer):
    """One DataLoader for the run (persistent workers): each epoch's batches and augmentation are those of the
    per-epoch loader with any number of workers, and a resumed epoch starts at the right batch."""
    write_image(tmp_path / "a.jpg", size=(16, 48))
    entries = [{"image": str(tmp_path / "a.jpg"), "caption": f"a man in a red shirt {i}", "pid": i, "label": LABEL27}
               for i in range(8)]
    dataset = data.PretrainDataset(entries, data.train_transform((48, 16), "mals"), tokenizer, max_tokens=20, seed=3)
    runs = {}
    for workers in (0, 2):
        loader, sampler = pretrain.run_loader(dataset, 4, 1, 0, 1, workers, torch.device("cpu"))
        runs[workers] = []
        for epoch in (0, 1, 1):
            sampler.set(epoch, start=1 if len(runs[workers]) == 4 else 0)  # the third pass resumes epoch 1
            runs[workers] += [(batch["pid"], batch["image"], batch["masked_ids"]) for batch in loader]
    assert len(runs[0]) == 5
    for a, b in zip(runs[0], runs[2]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    reference = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        per_epoch = pretrain.EpochBatches(8, 4, 1, epoch)
        reference += [(b["pid"], b["image"], b["masked_ids"]) for b in torch.utils.data.DataLoader(
            dataset, batch_sampler=per_epoch)]
    for a, b in zip(runs[0], reference + reference[-1:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- issue 16: real weights
# Folders as transformers' save_pretrained writes them (random tiny models, offline): a BERT of a width no preset
# has with tokenizer.json only, SwinModel folders, one official-format checkpoint of a non-base size, and one
# error line for every folder that is not one.

BERT_WORDS = ["man", "woman", "walk", "##ing", "red", "shirt", "black", "bag", "with", "the", "in", "of", "and"]


@pytest.fixture(scope="module")
def bert48(tmp_path_factory):
    """A 3-layer BERT of width 48 (3 heads) without MLM head, tokenizer.json and no vocab.txt (as transformers 5
    saves a tokenizer, and as many hub folders ship)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert48")
    letters = list("abcdefghijklmnopqrstuvwxyz.,'")
    vocab = data.SPECIAL_TOKENS + letters + ["##" + c for c in letters[:26]] + BERT_WORDS
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(folder)
    if (folder / "vocab.txt").exists():
        (folder / "vocab.txt").unlink()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=48, num_attention_heads=3, num_hidden_layers=3,
                         intermediate_size=96, max_position_embeddings=64)).save_pretrained(folder)
    assert (folder / "tokenizer.json").exists() and not (folder / "vocab.txt").exists()
    return folder


def test_bert_folder_of_any_width_with_tokenizer_json(bert48, capsys):
    """Spec §1.3: tokens are transformers' minus [SEP]; the text encoder equals BertModel; widths from config.json."""
    from transformers import BertModel, BertTokenizer

    tokenizer = data.Tokenizer.from_bert_dir(str(bert48))
    texts = ["A man walking with a red shirt", "the WOMAN in black, and a bag", "xyzzy"]
    reference = BertTokenizer.from_pretrained(bert48, local_files_only=True)(texts)["input_ids"]
    ids, atts = tokenizer(texts, 32, padding="longest")
    for row, mask, expected in zip(ids.tolist(), atts.tolist(), reference):
        assert expected[-1] == reference[0][-1]  # transformers ends with [SEP]; we do not (spec §1.3)
        assert row[:sum(mask)] == expected[:-1]
    config = M.config_for_bert(CONFIGS["tiny"], str(bert48))
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (48, 3, 96)
    assert (config.num_text_layers, config.num_cross_layers, config.vocab_size) == (1, 2, tokenizer.vocab_size)
    model = APTM(config).eval()
    load_bert(model, str(bert48))
    printed = capsys.readouterr().out
    assert "no MLM head" in printed and "starts fresh" in printed
    bert = BertModel.from_pretrained(bert48, local_files_only=True).eval()
    with torch.no_grad():
        hidden = bert(ids, attention_mask=atts, output_hidden_states=True).hidden_states
        torch.testing.assert_close(model.encode_text(ids, atts), hidden[1], atol=1e-5, rtol=1e-5)
    ours, theirs = model.text_encoder.bert.encoder.layer[2].state_dict(), bert.encoder.layer[2].state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())  # fusion layer 2 = BERT layer 2
    assert M.config_for_bert(CONFIGS["tiny"], str(bert48), text_layers=2).num_cross_layers == 1


def test_pretrain_with_a_bert_folder(bert48, world, tmp_path, one_thread):
    pretrain.main(run_args(world, tmp_path, "--bert", str(bert48), "--text-layers", "2", "--max-steps", "1",
                           "--val-dataset", "none"))
    config = torch.load(tmp_path / "ckpt.pt", weights_only=False)["config"]
    assert (config["hidden_size"], config["num_text_layers"], config["num_cross_layers"]) == (48, 2, 1)
    assert config["swin_dim"] == CONFIGS["tiny"].swin_dim


SWIN_HF = dict(image_size=224, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], window_size=7,
               drop_path_rate=0.0, layer_norm_eps=1e-5)
SWIN_224 = replace(CONFIGS["tiny"], image_size=(224, 224), patch_size=4, swin_dim=16, depths=(2, 2, 2, 2),
                   num_heads=(1, 1, 2, 2), window_size=7, vocab_size=50)


@pytest.mark.parametrize("head", [False, True])
def test_swin_transformers_folder(tmp_path, capsys, head):
    """A SwinModel (or SwinForImageClassification, 'swin.' prefix + classifier) folder at 224x224, window 7: our
    image tokens equal transformers' [pooler; last_hidden_state] (spec §1.2, §8.3)."""
    from transformers import SwinConfig, SwinForImageClassification, SwinModel

    torch.manual_seed(0)
    hf = (SwinForImageClassification if head else SwinModel)(SwinConfig(**SWIN_HF, num_labels=5)).eval()
    hf.save_pretrained(tmp_path)
    model = APTM(SWIN_224).eval()
    load_swin(model, str(tmp_path))
    loaded = len(model.vision_encoder.state_dict())  # 151 file tensors, query/key/value fused into qkv
    assert f"load_swin: {loaded} tensors from {tmp_path / 'model.safetensors'}" in capsys.readouterr().out
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = (hf.swin if head else hf)(images)
        expected = torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1)
        torch.testing.assert_close(model.encode_image(images), expected, atol=1e-5, rtol=1e-5)


def bad_folder(tmp_path, case, bert48):
    """A folder that is not the BERT or Swin it claims to be, and the fragment its error line must hold."""
    from transformers import BertConfig, BertModel, SwinConfig, SwinModel

    folder = tmp_path / case
    folder.mkdir()
    if case != "empty":
        (folder / "tokenizer.json").write_text((bert48 / "tokenizer.json").read_text())
        (folder / "config.json").write_text((bert48 / "config.json").read_text())
    if case == "broken config.json":
        (folder / "config.json").write_text('{"hidden_size": 48,')
        return folder, "config.json: not valid JSON"
    if case == "other widths":  # config.json of width 48 over the weights of a width-32 BERT
        vocab_size = json.loads((bert48 / "config.json").read_text())["vocab_size"]
        BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_attention_heads=2, num_hidden_layers=3,
                             intermediate_size=96, max_position_embeddings=64)).save_pretrained(tmp_path / "w32")
        (folder / "model.safetensors").write_bytes((tmp_path / "w32" / "model.safetensors").read_bytes())
        return folder, "tensors have other shapes"
    if case == "other model":  # BERT config.json over a Swin's weights: transformers would load it all MISSING
        SwinModel(SwinConfig(**SWIN_HF)).save_pretrained(tmp_path / "swin")
        (folder / "model.safetensors").write_bytes((tmp_path / "swin" / "model.safetensors").read_bytes())
        return folder, "text-encoder tensors are missing"
    return folder, {"empty": "neither vocab.txt nor tokenizer.json", "no weights": "no weights file"}[case]


@pytest.mark.parametrize("case", ["empty", "broken config.json", "no weights", "other widths", "other model"])
def test_bad_bert_folders_fail_in_one_line(case, bert48, tmp_path, capsys):
    folder, fragment = bad_folder(tmp_path, case, bert48)
    capsys.readouterr()  # save_pretrained's progress bar

    def build():  # what pretrain.py --bert DIR does
        tokenizer = data.Tokenizer.from_bert_dir(str(folder))
        config = replace(M.config_for_bert(CONFIGS["tiny"], str(folder)), vocab_size=tokenizer.vocab_size)
        load_bert(APTM(config), str(folder))

    err = expect_exit(capsys, fragment, build)
    assert err.count("\n") == 1 and str(folder) in err


def test_bad_folder_through_pretrain_main(bert48, world, tmp_path, capsys):
    """The worst case end to end: BERT config.json over another model's weights stops pretrain.py in one line
    naming the weights file (transformers itself would load it with every tensor MISSING and train on noise)."""
    folder, fragment = bad_folder(tmp_path, "other model", bert48)
    capsys.readouterr()
    err = expect_exit(capsys, fragment, pretrain.main, run_args(world, tmp_path / "out", "--bert", str(folder)))
    assert err.count("\n") == 1 and "model.safetensors" in err


def test_bad_swin_folders_fail_in_one_line(tmp_path, capsys):
    from transformers import SwinConfig, SwinModel

    expect_exit(capsys, "config.json: not found", load_swin, small_model(), str(tmp_path))
    SwinModel(SwinConfig(**SWIN_HF)).save_pretrained(tmp_path)  # widths 16..128, the model's 32..128
    capsys.readouterr()
    err = expect_exit(capsys, "shape mismatch", load_swin, small_model(), str(tmp_path))
    assert err.count("\n") == 1 and "model.safetensors" in err


def test_bad_image_in_a_loader_worker_fails_as_in_the_main_process(tmp_path, capfd):
    """A corrupt image met in a data-loader worker ends the run with its one error line and exit 2, as with no
    workers (it ended with the DataLoader's "worker exited unexpectedly" traceback, exit 1)."""
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    Image.new("RGB", (16, 48)).save(good)
    bad.write_text("junk")
    dataset = data.ImageDataset([str(good), str(bad)], data.test_transform((48, 16), data.NORMALIZATION["synthetic"]))
    for workers in (0, 1):
        with pytest.raises(SystemExit) as error:
            list(data.Loader(dataset, batch_size=1, num_workers=workers))
        assert error.value.code == 2 and f"error: {bad}: cannot read the image" in capfd.readouterr().err


def test_unreadable_weight_files_fail_in_one_line(tmp_path, capsys):
    """A truncated checkpoint, Swin .pth or weights file stops the run with one line naming it, no traceback."""
    source = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, source)
    truncated = source.read_bytes()[:40]
    for name in ("ckpt.pt", "swin.pth", "model.safetensors", "pytorch_model.bin"):
        (tmp_path / name).write_bytes(truncated)
    for fragment, call, arg in (("cannot be read as a torch checkpoint", data.read_checkpoint, "ckpt.pt"),
                                ("cannot be read as Swin weights", lambda p: load_swin(small_model(), p), "swin.pth"),
                                ("cannot be read as weights", M.read_folder_weights, "")):
        err = expect_exit(capsys, fragment, call, str(tmp_path / arg))
        assert err.count("\n") == 1 and str(tmp_path / (arg or "model.safetensors")) in err
    (tmp_path / "model.safetensors").unlink()  # the folder's next weights file
    err = expect_exit(capsys, "cannot be read as weights", M.read_folder_weights, str(tmp_path))
    assert "pytorch_model.bin" in err


def test_official_checkpoint_of_a_small_size(bert48, tmp_path):
    """An official-format checkpoint (old text_encoder. prefix, buffers, yaml config naming its JSON files) of a
    small Swin and a 4-layer BERT rebuilds at its own size on evaluate.py --ckpt's path (spec §5.3, §8)."""
    tokenizer = data.Tokenizer.from_bert_dir(str(bert48))
    config = replace(CONFIGS["aptm-base"], image_size=(64, 32), swin_dim=16, depths=(2, 2), num_heads=(1, 2),
                     window_size=4, hidden_size=128, num_attention_heads=2, num_text_layers=2, num_cross_layers=2,
                     intermediate_size=64, max_position_embeddings=64, embed_dim=32, vocab_size=tokenizer.vocab_size,
                     max_tokens=20)
    source = small_model(3, config).eval()
    yaml = {"vision_config": "configs/config_swinT_384.json", "text_config": "configs/config_bert.json",
            "image_res": 64, "h": 64, "w": 32, "embed_dim": 32, "max_tokens": 20, "batch_size_train": 120}
    path = str(tmp_path / "checkpoint_best.pth")
    torch.save({"model": official_state_dict(source, old_prefix=True), "config": yaml}, path)
    model, _ = data.load_model_and_tokenizer(path, str(bert48), torch.device("cpu"))
    assert model.config == config
    ids, atts = tokenizer(["a man walking", "a woman with a red bag"], 20)
    images = images_for(config, B=2)

    def features(net):
        image_embeds, text_embeds = net.encode_image(images), net.encode_text(ids, atts)
        return net.image_feat(image_embeds), net.text_feat(text_embeds), net.itm_logits(text_embeds, atts, image_embeds)

    with torch.no_grad():
        for ours, theirs in zip(features(model), features(source)):
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
