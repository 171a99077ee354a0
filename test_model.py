"""Tests for model.py (spec §1, §5.1, §5.3, §8, §11). CPU, offline, tiny sizes:

    HF_HUB_OFFLINE=1 python -m pytest -q test_model.py
"""

import os
from dataclasses import asdict, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import APTM, CONFIGS, build_from_checkpoint, load_bert, load_state, load_swin, optimizer_groups

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
    with pytest.raises(ValueError, match="layers.0.blocks.0.attn.extra"):
        load_swin(target, tmp_path / "bad.pth")


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


def test_load_state_errors_name_the_keys():
    source, target = small_model(1), small_model(2)
    state = official_state_dict(source)
    with pytest.raises(ValueError, match="unexpected.*foo.bar"):
        load_state(target, {**state, "foo.bar": torch.zeros(1)})
    del state["text_proj.bias"]
    with pytest.raises(ValueError, match="missing.*text_proj.bias"):
        load_state(target, state)
    state = official_state_dict(source)
    state["vision_proj.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape mismatch.*vision_proj.bias"):
        load_state(target, state)


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
