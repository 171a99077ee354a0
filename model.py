"""APTM model: Swin image encoder, BERT text encoder, BERT cross encoder, heads, weight loading.

Spec sections: §1 (architecture), §1.6 (parameter count), §5.1 (optimiser groups), §5.3 (checkpoint
renaming), §8 (official key names), §11 (numerics confirmed against the official code).

    model = APTM(CONFIGS["tiny"])
    image_embeds = model.encode_image(images)                        # (B, N, Dv)
    text_embeds = model.encode_text(input_ids, attention_mask)        # (B, L, Dt)
    image_feat, text_feat = model.image_feat(image_embeds), model.text_feat(text_embeds)   # (B, D)
    itm = model.itm_logits(text_embeds, attention_mask, image_embeds)                      # (B, 2)
    mlm = model.mlm_logits(masked_ids, attention_mask, image_embeds, masked_pos)            # (B, M, V)

The model returns features and logits, never losses; it never moves itself between devices and never
calls torch.distributed.

Shape letters: B batch, L text tokens, N image tokens (1 mean token + patches), Dv vision width,
Dt text width, D projection dim, M masked positions per row, V vocabulary, C Swin stage width,
H x W Swin stage grid, w window side, T = w*w tokens per window, nW windows per image, nH heads.
"""

import json
import math
import os
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertLayer,
    BertOnlyMLMHead,
    BertOutput,
    BertSelfOutput,
)



@dataclass
class APTMConfig:
    image_size: tuple = (384, 128)  # (H, W) [configs/config_swinB_384.json]
    patch_size: int = 4
    swin_dim: int = 128  # stage-0 width; vision_width = swin_dim * 2**(len(depths)-1)
    depths: tuple = (2, 2, 18, 2)
    num_heads: tuple = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    vocab_size: int = 30522  # overwritten from the tokenizer by the scripts
    hidden_size: int = 768
    num_text_layers: int = 6  # BERT layers 0-5 (spec §1.3)
    num_cross_layers: int = 6  # BERT layers 6-11 with cross-attention (spec §1.4)
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    embed_dim: int = 256  # ITC projection (spec §1.5)
    temp: float = 0.07  # initial τ, no clamp (spec §1.5)
    max_tokens: int = 56  # caption length incl. [CLS] (spec §1.3)
    init_std: float = 0.02  # std of new weights: BERT's initializer_range and Swin's trunc-normal (spec §1.2, §1.4)

    @property
    def vision_width(self):
        return self.swin_dim * 2 ** (len(self.depths) - 1)


CONFIGS = {
    # the paper: Swin-B at 384x128 + BERT-base split 6/6 (spec §0, §1)
    "aptm-base": APTMConfig(),
    # our CPU default (not the paper): toy widths; the world's own 192x64 images cut into 8x8 patches, so the Swin
    # stage grids are 24x8 (window 4, shifted), 12x4, 6x2 (as 96x32 with patch 4 was, at the same cost per layer);
    # no dropout or drop-path: a 10-minute run needs fitting, not regularising (and the random masks cost ~20%
    # of a CPU step). Trained from scratch, it needs two departures to escape ITC's collapse (all features equal,
    # loss ln B): init_std 0.125 ≈ 1/sqrt(64) instead of 0.02 (tuned for width 768 and pre-trained weights;
    # for Swin too: an attribute probe on the pooled features reached 59% mA instead of 54% in 300 steps), so
    # that features depend on the input at initialisation, and τ starting at 0.2 instead of 0.07 (measured:
    # with 0.02 / 0.07 every caption gets the same [CLS] and ITC stays at ln B).
    "tiny": APTMConfig(
        image_size=(192, 64), patch_size=8, swin_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4,
        hidden_size=64, num_text_layers=2, num_cross_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
        drop_path_rate=0.0, embed_dim=64, max_tokens=40, init_std=0.125, temp=0.2,
    ),
}


# ----------------------------------------------------------------------------------------------
# Swin transformer (spec §1.2), official key names (spec §8.2)


def window_partition(x, window):
    """(B, H, W, C) -> (B*nW, T, C), windows in row-major order per image."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)  # (B*nW, T, C)


def window_reverse(windows, window, H, W):
    """(B*nW, T, C) -> (B, H, W, C), inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)  # (B, H, W, C)


def relative_position_index(window):
    """(T, T) index into the (2w-1)^2 bias table: (dh + w-1)(2w-1) + (dw + w-1) (spec §1.2)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # (2, T)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (T, T, 2)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]  # (T, T)


def shifted_window_mask(H, W, window, shift):
    """(nW, T, T) additive mask for a cyclic shift: 0 within a region, -100 across (spec §1.2)."""
    region = torch.zeros(1, H, W, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):  # the 9 regions of the rolled image
        for j, cols in enumerate(bands):
            region[:, rows, cols, :] = 3 * i + j
    region = window_partition(region, window).squeeze(-1)  # (nW, T)
    different = region[:, None, :] != region[:, :, None]  # (nW, T, T)
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale survivors.

    The rate p is a 0-dim buffer, not a Python float: torch.compile guards on Python numbers, so 24 blocks
    with 24 different rates would compile SwinBlock.forward 24 times; as a tensor they share one graph.
    """

    def __init__(self, p):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)
        self.drops = p > 0  # a rate of 0 is the identity; no random draw

    def forward(self, x):
        if not self.drops or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)  # (B, 1, ...)
        return x * keep / (1.0 - self.p)


class WindowAttention(nn.Module):
    def __init__(self, dim, num_heads, window):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: q, k, v
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, x, mask=None):
        """x (B*nW, T, C), mask (nW, T, T) or None -> (B*nW, T, C)."""
        Bw, T, C = x.shape
        q, k, v = self.qkv(x).view(Bw, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index]  # (T, T, nH)
        bias = bias.permute(2, 0, 1).unsqueeze(0)  # (1, nH, T, T)
        if mask is not None:
            # fold the windows of an image into the head axis so the (nW, nH, T, T) bias broadcasts
            # over the batch without copies: (B*nW, nH) -> (B, nW*nH)
            nW = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).reshape(1, nW * self.num_heads, T, T)  # (1, nW*nH, T, T)
            q, k, v = (t.reshape(Bw // nW, nW * self.num_heads, T, -1) for t in (q, k, v))
        # scale = head_dim^-0.5 (qk_scale None), no attention dropout (spec §1.2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.reshape(Bw, self.num_heads, T, -1).transpose(1, 2).reshape(Bw, T, C)  # (B*nW, T, C)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim, resolution, num_heads, window, shift, mlp_ratio, drop_path):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window:  # official rule: no shift, window = the smaller side (spec §1.2)
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(*resolution, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x):
        """x (B, H*W, C) -> (B, H*W, C). Pre-norm; drop-path on both residual branches (spec §1.2)."""
        B, _, C = x.shape
        H, W = self.resolution
        y = self.norm1(x).view(B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), self.attn_mask)  # (B*nW, T, C)
        y = window_reverse(y, self.window, H, W)  # (B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(B, H * W, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, resolution, dim):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        """(B, H*W, C) -> (B, H/2*W/2, 2C); neighbour order (even,even), (odd,even), (even,odd), (odd,odd)."""
        B, _, C = x.shape
        H, W = self.resolution
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))  # (B, H*W/4, 2C)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images):
        return self.norm(self.proj(images).flatten(2).transpose(1, 2))  # (B, H*W, C)


def run_layer(layer, checkpointing, *args):
    """layer(*args); with activation checkpointing on (and gradients wanted) its activations are not kept but
    recomputed in the backward, with the same random state (dropout, drop-path), so the gradients are the
    same. Trades ~1/3 more compute for memory (our choice, off by default; APTM.checkpointing)."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class SwinStage(nn.Module):
    def __init__(self, blocks, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x, checkpointing=False):
        for block in self.blocks:
            x = run_layer(block, checkpointing, x)
        return x if self.downsample is None else self.downsample(x)


@torch.no_grad()
def init_swin(module, std=0.02):
    """Official Swin init: trunc-normal(std) Linear weights and bias tables, zero biases, LN 1/0 (spec §1.2)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=std)


class SwinTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        H, W = (s // config.patch_size for s in config.image_size)
        self.patch_embed = PatchEmbed(config.patch_size, config.swin_dim)
        # drop-path rates linearly spaced over all blocks, in block order (spec §1.2)
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
            dim, resolution = config.swin_dim * 2**i, (H // 2**i, W // 2**i)
            window = min(config.window_size, *resolution)
            last = i == len(config.depths) - 1
            odd = any(side % 2 for side in resolution) and not last
            if any(side % window for side in resolution) or odd:
                raise ValueError(f"image_size {config.image_size}: Swin stage {i} grid {resolution} must be a "
                                 f"multiple of its window {window} (and even before a patch merging)")
            blocks = [
                SwinBlock(dim, resolution, heads, config.window_size, (config.window_size // 2) * (j % 2),
                          config.mlp_ratio, rates.pop(0))
                for j in range(depth)
            ]
            self.layers.append(SwinStage(blocks, None if last else PatchMerging(resolution, dim)))
        self.norm = nn.LayerNorm(config.vision_width)
        self.apply(lambda module: init_swin(module, config.init_std))

    def forward(self, images, checkpointing=False):
        """images (B, 3, H, W) -> image_embeds (B, 1 + patches, Dv); token 0 = mean of the normed tokens."""
        x = self.patch_embed(images)  # (B, H/4*W/4, C)
        for layer in self.layers:
            x = layer(x, checkpointing)
        x = self.norm(x)  # (B, patches, Dv)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, N, Dv) (spec §1.2, §11)


# ----------------------------------------------------------------------------------------------
# Text and cross encoders (spec §1.3, §1.4): transformers' BERT pieces + our cross-attention


def bert_config(config):
    return BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_text_layers + config.num_cross_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act="gelu", hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=2,
        layer_norm_eps=1e-12, pad_token_id=0, attn_implementation="sdpa",
    )  # exact-erf GELU, post-LN eps 1e-12 (spec §11); is_decoder False -> self-attention not causal


class CrossSelfAttention(nn.Module):
    """Query from the text (Dt -> Dt); key and value from the image tokens (Dv -> Dt) (spec §1.4)."""

    def __init__(self, hidden_size, vision_width, num_heads, dropout):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(vision_width, hidden_size)
        self.value = nn.Linear(vision_width, hidden_size)

    def key_value(self, image_embeds):
        """image_embeds (B, N, Dv) -> key, value, each (B, nH, N, Dt/nH)."""
        B, N, _ = image_embeds.shape
        k = self.key(image_embeds).view(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.value(image_embeds).view(B, N, self.num_heads, -1).transpose(1, 2)
        return k, v

    def forward(self, hidden_states, image_kv):
        """hidden_states (B, L, Dt), image_kv from key_value -> (B, L, Dt). All image tokens are valid."""
        B, L, Dt = hidden_states.shape
        q = self.query(hidden_states).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, nH, L, Dt/nH)
        k, v = image_kv
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, nH, L, Dt/nH)
        return out.transpose(1, 2).reshape(B, L, Dt)


class CrossAttention(nn.Module):
    def __init__(self, bert_cfg, vision_width):
        super().__init__()
        self.self = CrossSelfAttention(bert_cfg.hidden_size, vision_width, bert_cfg.num_attention_heads,
                                       bert_cfg.attention_probs_dropout_prob)
        self.output = BertSelfOutput(bert_cfg)  # dense -> dropout -> LayerNorm(. + input)

    def forward(self, hidden_states, image_kv):
        return self.output(self.self(hidden_states, image_kv), hidden_states)


class FusionLayer(nn.Module):
    """BERT layer 6..11: self-attention -> cross-attention -> FFN, each post-LN (spec §1.4)."""

    def __init__(self, bert_cfg, vision_width):
        super().__init__()
        self.attention = BertAttention(bert_cfg)
        self.crossattention = CrossAttention(bert_cfg, vision_width)
        self.intermediate = BertIntermediate(bert_cfg)
        self.output = BertOutput(bert_cfg)

    def forward(self, hidden_states, attention_mask, image_kv, positions=None):
        """(B, L, Dt) -> (B, L, Dt); with positions (B, Q), those positions alone -> (B, Q, Dt) (ours, same values):
        they are the only queries of the self-attention (keys and values still come from every token), and the
        cross-attention and the FFN see only their rows. For the last layer, where ITM reads [CLS] alone and MLM
        the masked positions."""
        if positions is None:
            hidden_states, _ = self.attention(hidden_states, attention_mask)
        else:
            attention = self.attention.self
            B, _, Dt = hidden_states.shape
            heads = lambda x: x.view(B, x.shape[1], attention.num_attention_heads, -1).transpose(1, 2)  # noqa: E731
            rows = hidden_states.gather(1, positions[..., None].expand(-1, -1, Dt))  # (B, Q, Dt)
            q = heads(attention.query(rows))  # (B, nH, Q, Dt/nH)
            k, v = heads(attention.key(hidden_states)), heads(attention.value(hidden_states))  # (B, nH, L, Dt/nH)
            dropout = attention.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout,
                                                 scale=attention.scaling)  # (B, nH, Q, Dt/nH)
            hidden_states = self.attention.output(out.transpose(1, 2).reshape(B, -1, Dt), rows)  # (B, Q, Dt)
        hidden_states = self.crossattention(hidden_states, image_kv)
        return self.output(self.intermediate(hidden_states), hidden_states)


@torch.no_grad()
def init_bert(module, std=0.02):
    """BERT _init_weights: N(0, std) Linear/Embedding, zero biases and pad row, LN 1/0 (spec §1.4)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding) and module.padding_idx is not None:
        module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, BertOnlyMLMHead):
        nn.init.zeros_(module.predictions.bias)


class TextEncoder(nn.Module):
    """Holds the official key layout: bert.embeddings, bert.encoder.layer.{i}, cls.predictions (spec §8.2)."""

    def __init__(self, config):
        super().__init__()
        cfg = bert_config(config)
        layers = [BertLayer(cfg, layer_idx=i) for i in range(config.num_text_layers)]
        layers += [FusionLayer(cfg, config.vision_width) for _ in range(config.num_cross_layers)]
        self.bert = nn.ModuleDict(dict(
            embeddings=BertEmbeddings(cfg),  # word + position + token-type(0) -> LayerNorm -> dropout
            encoder=nn.ModuleDict(dict(layer=nn.ModuleList(layers))),
        ))
        self.cls = BertOnlyMLMHead(cfg)  # predictions.{transform.dense, transform.LayerNorm, decoder, bias}
        self.apply(lambda module: init_bert(module, config.init_std))
        # tie the MLM decoder to the word embeddings, and decoder.bias to predictions.bias (spec §1.5, §8.2)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias


def take_kv(image_kv, index):
    """Rows `index` (R,) of every fusion layer's cached (key, value) from APTM.cross_kv: the pairs' images."""
    return [(k[index], v[index]) for k, v in image_kv]


def key_padding_mask(attention_mask):
    """(B, L) 1 = token, 0 = pad -> (B, 1, 1, L) bool, True = may attend (same as -10000 on pads, spec §11)."""
    return attention_mask.bool()[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# APTM


class APTM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        Dv, Dt = config.vision_width, config.hidden_size
        self.vision_encoder = SwinTransformer(config)
        self.text_encoder = TextEncoder(config)
        self.vision_proj = nn.Linear(Dv, config.embed_dim)
        self.text_proj = nn.Linear(Dt, config.embed_dim)
        self.itm_head = nn.Sequential(nn.Linear(Dt, 2 * Dt), nn.LayerNorm(2 * Dt), nn.GELU(), nn.Linear(2 * Dt, 2))
        self.temp = nn.Parameter(torch.tensor(config.temp))  # τ, 0-dim, no clamp (spec §1.5)
        # activation checkpointing of every Swin block and text/fusion layer (run_layer); a run setting, not
        # part of the architecture, so not in APTMConfig
        self.checkpointing = False
        # the encoders initialise themselves (init_swin, init_bert); vision_proj, text_proj and
        # itm_head keep PyTorch's default init (spec §1.5)

    @property
    def text_layers(self):
        return self.text_encoder.bert.encoder.layer[: self.config.num_text_layers]

    @property
    def fusion_layers(self):
        return self.text_encoder.bert.encoder.layer[self.config.num_text_layers:]

    def encode_image(self, images):
        """images (B, 3, H, W) -> image_embeds (B, N, Dv) (spec §1.2)."""
        return self.vision_encoder(images, self.checkpointing)

    def encode_text(self, input_ids, attention_mask):
        """'text' mode: embeddings + text layers. (B, L), (B, L) -> text_embeds (B, L, Dt) (spec §1.3)."""
        mask = key_padding_mask(attention_mask)  # (B, 1, 1, L)
        hidden_states = self.text_encoder.bert.embeddings(input_ids=input_ids)  # (B, L, Dt)
        for layer in self.text_layers:
            hidden_states = run_layer(layer, self.checkpointing, hidden_states, mask)
        return hidden_states

    def cross_kv(self, image_embeds):
        """image_embeds (B, N, Dv) -> per fusion layer (key, value), each (B, nH, N, Dt/nH).

        Lets evaluation and training project each image once and reuse it for many texts: index the
        batch axis with take_kv(kv, idx) and pass it to encode_cross / itm_logits / mlm_logits(image_kv=...).
        """
        return [layer.crossattention.self.key_value(image_embeds) for layer in self.fusion_layers]

    def encode_cross(self, text_embeds, text_atts, image_embeds=None, image_kv=None, positions=None):
        """'fusion' mode: fusion layers on text_embeds (B, L, Dt) with image_embeds (B, N, Dv) or
        image_kv from cross_kv -> (B, L, Dt). Position 0 is the fused [CLS] (spec §1.4). With positions (B, Q)
        the last layer computes those alone -> (B, Q, Dt) (FusionLayer.forward; ours, same values)."""
        if image_kv is None:
            image_kv = self.cross_kv(image_embeds)
        mask = key_padding_mask(text_atts)  # (B, 1, 1, L)
        hidden_states = text_embeds
        last = len(self.fusion_layers) - 1
        for i, (layer, kv) in enumerate(zip(self.fusion_layers, image_kv)):
            rows = positions if i == last else None
            hidden_states = run_layer(layer, self.checkpointing, hidden_states, mask, kv, rows)
        return hidden_states

    def itm_logits(self, text_embeds, text_atts, image_embeds=None, image_kv=None):
        """-> (B, 2) fp32 logits, index 1 = match (spec §2.3, §11). The last fusion layer computes [CLS] alone."""
        first = torch.zeros(text_embeds.shape[0], 1, dtype=torch.long, device=text_embeds.device)  # (B, 1)
        cls = self.encode_cross(text_embeds, text_atts, image_embeds, image_kv, positions=first)[:, 0]  # (B, Dt)
        return self.itm_head(cls).float()

    def mlm_logits(self, input_ids, attention_mask, image_embeds, masked_pos, image_kv=None):
        """'multi_modal' mode: all layers from the embeddings on the masked ids, with the unmasked
        caption's attention mask; logits at masked_pos (B, M) -> (B, M, V) fp32 (spec §2.4, §11). The last
        fusion layer computes the masked positions alone."""
        hidden_states = self.encode_text(input_ids, attention_mask)  # (B, L, Dt)
        hidden_states = self.encode_cross(hidden_states, attention_mask, image_embeds, image_kv, masked_pos)  # (B,M,Dt)
        return self.text_encoder.cls(hidden_states).float()  # (B, M, V)

    def image_feat(self, image_embeds):
        """(B, N, Dv) -> (B, D), not normalised (spec §11)."""
        return self.vision_proj(image_embeds[:, 0])

    def text_feat(self, text_embeds):
        """(B, L, Dt) -> (B, D), not normalised (spec §11)."""
        return self.text_proj(text_embeds[:, 0])


# ----------------------------------------------------------------------------------------------
# Optimiser parameter groups (spec §5.1)

# a parameter is not decayed if its name CONTAINS one of these [optim.py]; so every bias, every
# LayerNorm, Swin's relative_position_bias_table and cls.predictions.bias; temp and itm_head.1.weight are decayed
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
            "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")


def double_lr_prefixes(config, double_lr):
    """Name prefixes of the parameters trained at lr_mult x lr (spec §5.1)."""
    nt, nc, ns = config.num_text_layers, config.num_cross_layers, len(config.depths)
    layer = "text_encoder.bert.encoder.layer."
    if double_lr == "cross":  # pre-training: the cross-attention missing from bert-base-uncased
        return tuple(f"{layer}{i}.crossattention." for i in range(nt, nt + nc))
    if double_lr == "finetune":  # fine-tuning: last 2 Swin stages, last 2 text and 2 fusion layers, heads
        stages = [f"vision_encoder.layers.{i}." for i in range(max(0, ns - 2), ns)]
        layers = [f"{layer}{i}." for i in [*range(max(0, nt - 2), nt), *range(max(nt, nt + nc - 2), nt + nc)]]
        return tuple(stages + layers + ["text_encoder.cls.", "vision_proj.", "text_proj.", "itm_head."])
    if double_lr == "none":
        return ()
    raise ValueError(f"double_lr must be 'cross', 'finetune' or 'none', got {double_lr!r}")


ADAMW_BETAS, ADAMW_EPS = (0.9, 0.98), 1e-8  # spec §5.1 [optim.py]


def optimizer_groups(model, weight_decay=0.01, lr=1e-4, lr_mult=2.0, double_lr="cross"):
    """Four AdamW groups: (decay, lr), (no decay, lr), (decay, lr_mult*lr), (no decay, lr_mult*lr).

    A schedule multiplies each group's own lr by get_lr(step). Pass the unwrapped model (no DDP "module."
    prefix). Tied tensors appear once, under their first name (the MLM decoder weight under word_embeddings,
    so it gets the base lr, spec §5.1).
    """
    fast = double_lr_prefixes(model.config, double_lr)
    groups = [dict(params=[], weight_decay=wd, lr=lr * mult)
              for mult in (1.0, lr_mult) for wd in (weight_decay, 0.0)]
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay = any(s in name for s in NO_DECAY)
            groups[2 * name.startswith(fast) + no_decay]["params"].append(param)
    return groups


def amp_dtype(device, dtype="auto"):
    """The autocast dtype, None for fp32. dtype "auto": bf16 on CUDA (fp16 where bf16 is missing), None (fp32)
    elsewhere; or a torch dtype name ("float32" for parity with published numbers: the official evaluation is fp32)."""
    if dtype == "auto":
        if torch.device(device).type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if dtype == "float32" else getattr(torch, dtype)


def autocast_for(device, dtype="auto"):
    """Autocast at amp_dtype(device, dtype), or no autocast where that is fp32."""
    amp = amp_dtype(device, dtype)
    return torch.autocast(torch.device(device).type, dtype=amp) if amp is not None else nullcontext()


# ----------------------------------------------------------------------------------------------
# Weight loading: BERT folders, Microsoft's Swin .pth and transformers' Swin folders, our and the official
# APTM checkpoints. Every bad file or folder ends in one `error: ...` line naming it (fail, exit 2).

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what transformers' save_pretrained writes


class BadInput(Exception):
    """`fail` in a data-loader worker process, where SystemExit would end only the worker (and the main process
    would stop with the DataLoader's traceback): the DataLoader carries this one over, and data.Loader exits."""


def fail(message):
    """Print `error: <message>` to stderr and exit with status 2 (bad input, never a traceback). It lives here,
    in the file every other imports (data.py too), so that the loaders below can use it."""
    print(f"error: {message}", file=sys.stderr)
    if torch.utils.data.get_worker_info() is not None:
        raise BadInput(message)
    raise SystemExit(2)


def read_json(path):
    """The parsed JSON of a file that exists, failing in one line if it cannot be read as JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(f"{path}: not valid JSON ({error})")


def read_torch_file(path, what, weights_only=True):
    """The tensors of a .safetensors file or what torch.load finds in any other, on the CPU; a truncated or foreign
    file stops the run with one line naming it and `what` it should have been."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file  # installed with transformers

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        fail(f"{path}: cannot be read as {what} ({error.__class__.__name__}: {str(error)[:200]})")


def load_into(module, state_dict, what):
    """Strict load with one error line naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: {tuple(state_dict[k].shape)} vs ours {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape)
    problems = [f"{label} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if keys]
    if problems:
        fail(f"cannot load {what}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)
    return len(state_dict)


def read_folder_config(folder, flag):
    """config.json of a transformers model folder, as a dict."""
    if not os.path.isdir(folder):
        fail(f"{flag} {folder}: not a folder")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        fail(f"{path}: not found; {flag} needs a transformers model folder (config.json + {' or '.join(WEIGHT_FILES)})")
    config = read_json(path)
    if not isinstance(config, dict):
        fail(f"{path}: not a JSON object")
    return config


def read_folder_weights(folder):
    """(path, state dict) of the folder's model.safetensors or pytorch_model.bin, on the CPU."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            state = read_torch_file(path, "weights")
            if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
                fail(f"{path}: not a state dict of tensors")
            return path, state
    fail(f"{folder}: no weights file ({' or '.join(WEIGHT_FILES)})")


# the text widths a BERT config.json sets (spec §1.3); its layers are split into text + fusion layers
BERT_WIDTHS = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings")


def config_for_bert(config, bert_dir, text_layers=None):
    """`config` with the text side of bert_dir/config.json: its widths, and its layers split into
    `text_layers` text layers and the rest fusion layers (default half and half, as BERT-base's 6 + 6 in the
    paper, spec §1.3, §1.4). The Swin side, dropout and init stay the preset's."""
    bert = read_folder_config(bert_dir, "--bert")
    path = os.path.join(bert_dir, "config.json")
    keys = BERT_WIDTHS + ("num_hidden_layers",)
    absent = [key for key in keys if not isinstance(bert.get(key), int) or bert[key] < 1]
    if absent:
        fail(f"{path}: no positive integer {', '.join(absent)}: not a BERT config")
    for key, ours in (("hidden_act", "gelu"), ("layer_norm_eps", 1e-12), ("position_embedding_type", "absolute")):
        if bert.get(key, ours) != ours:
            fail(f"{path}: {key} {bert[key]!r}; the text encoder is BERT's with {key} {ours!r} (spec §1.3)")
    if bert["hidden_size"] % bert["num_attention_heads"]:
        fail(f"{path}: hidden_size {bert['hidden_size']} is not a multiple of num_attention_heads "
             f"{bert['num_attention_heads']}")
    layers = bert["num_hidden_layers"]
    text_layers = layers // 2 if text_layers is None else text_layers
    if not 0 < text_layers < layers:
        fail(f"{path}: {layers} layers cannot be split into {text_layers} text layers and at least one fusion layer")
    return replace(config, **{key: bert[key] for key in BERT_WIDTHS},
                   num_text_layers=text_layers, num_cross_layers=layers - text_layers)


def bert_key(key):
    """A BERT file's key in our text encoder's names: BertModel saves without the 'bert.' prefix, old TF
    conversions name LayerNorm's weight and bias gamma and beta."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return "bert." + key if key.startswith(("embeddings.", "encoder.")) else key


def load_bert(model, bert_dir):
    """Fill the text encoder from a BERT folder as transformers' save_pretrained writes it (config.json +
    model.safetensors or pytorch_model.bin; BertModel or BertForMaskedLM keys): the embeddings, BERT layer i
    into our layer i (the text layers, then the self-attention and FFN of the fusion layers) and the MLM head
    (spec §1.3, §1.4). Build the model with config_for_bert(config, bert_dir). Every encoder tensor must come
    from the file; a file without the MLM head leaves it fresh; the cross-attention always starts fresh."""
    read_folder_config(bert_dir, "--bert")
    path, state = read_folder_weights(bert_dir)
    state = {bert_key(k): v for k, v in state.items()}
    own = model.text_encoder.state_dict()
    encoder = [k for k in own if k.startswith("bert.") and ".crossattention." not in k]
    head = [k for k in own if k.startswith("cls.predictions.") and ".decoder." not in k]  # decoder is tied
    missing = [k for k in encoder if k not in state]
    if missing:
        fail(f"{path}: {len(missing)} of the {len(encoder)} text-encoder tensors are missing (e.g. "
             f"{', '.join(missing[:3])}): not the weights of the BERT its config.json describes")
    wanted = encoder + (head if all(k in state for k in head) else [])
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wanted if state[k].shape != own[k].shape]
    if shapes:
        fail(f"{path}: {len(shapes)} tensors have other shapes than the model built from config.json and the "
             f"tokenizer (e.g. {', '.join(shapes[:3])})")
    model.text_encoder.load_state_dict({k: state[k] for k in wanted}, strict=False)
    fresh = sum(".crossattention." in k for k in own)
    print(f"load_bert: {len(wanted)} tensors from {path}; {fresh} cross-attention tensors keep their fresh init")
    if len(wanted) == len(encoder):
        print(f"load_bert: {path} has no MLM head (cls.predictions): it starts fresh")


def geometric_coordinates(src, dst):
    """BEiT source grid {0, ±1, ±(1+q), ±(1+q+q²), ...}; q by bisection on [1.01, 1.5] to 1e-6 so that the
    half-width ≈ dst//2 (spec §1.2)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    distances, current = [], 1.0
    for i in range(src // 2):
        distances.append(current)
        current += q ** (i + 1)
    return [-d for d in reversed(distances)] + [0.0] + distances


def not_a_knot_matrix(x, x_new):
    """(len(x_new), len(x)) matrix S with f(x_new) = S @ y for the not-a-knot cubic spline through (x, y).

    Slopes s solve A s = R y (C² at interior knots, third derivative continuous at x[1] and x[-2]), as in
    scipy's CubicSpline; points outside [x[0], x[-1]] are clamped to the ends, as FITPACK's bispev does.
    """
    n = len(x)
    h = x[1:] - x[:-1]  # (n-1,)
    delta = torch.zeros(n - 1, n, dtype=x.dtype)  # (y[i+1] - y[i]) / h[i] = delta @ y
    delta[torch.arange(n - 1), torch.arange(n - 1)] = -1.0 / h
    delta[torch.arange(n - 1), torch.arange(1, n)] = 1.0 / h
    A = torch.zeros(n, n, dtype=x.dtype)
    R = torch.zeros(n, n, dtype=x.dtype)
    for i in range(1, n - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i], 2.0 * (h[i - 1] + h[i]), h[i - 1]
        R[i] = 3.0 * (h[i] * delta[i - 1] + h[i - 1] * delta[i])
    d = x[2] - x[0]
    A[0, 0], A[0, 1] = h[1], d
    R[0] = ((h[0] + 2.0 * d) * h[1] * delta[0] + h[0] ** 2 * delta[1]) / d
    d = x[-1] - x[-3]
    A[-1, -1], A[-1, -2] = h[-2], d
    R[-1] = (h[-1] ** 2 * delta[-2] + (2.0 * d + h[-1]) * h[-2] * delta[-1]) / d
    slopes = torch.linalg.solve(A, R)  # (n, n): s = slopes @ y
    x_new = x_new.clamp(x[0], x[-1])
    seg = (torch.searchsorted(x, x_new, right=True) - 1).clamp(0, n - 2)  # (m,)
    t = ((x_new - x[seg]) / h[seg]).unsqueeze(1)  # (m, 1)
    rows = torch.arange(len(x_new))
    S = torch.zeros(len(x_new), n, dtype=x.dtype)
    S[rows, seg] += (2 * t**3 - 3 * t**2 + 1).squeeze(1)  # Hermite basis h00
    S[rows, seg + 1] += (-2 * t**3 + 3 * t**2).squeeze(1)  # h01
    S += h[seg].unsqueeze(1) * ((t**3 - 2 * t**2 + t) * slopes[seg] + (t**3 - t**2) * slopes[seg + 1])
    return S


def resize_relative_position_bias_table(table, dst):
    """(src², nH) -> (dst², nH): per head, the src×src (dh, dw) table resampled from the geometric grid
    onto the integers -dst//2..dst//2 with a tensor-product not-a-knot cubic spline, the scipy-free
    equivalent of the official interp2d(kind='cubic') (spec §1.2)."""
    src = math.isqrt(table.shape[0])
    if src == dst:
        return table
    if src < 4:
        raise ValueError(f"cannot resize a {src}x{src} relative-position table (needs at least 4x4)")
    x = torch.tensor(geometric_coordinates(src, dst), dtype=torch.float64)
    x_new = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
    S = not_a_knot_matrix(x, x_new)  # (dst, src)
    grid = table.detach().double().t().reshape(-1, src, src)  # (nH, src, src)
    out = S @ grid @ S.t()  # (nH, dst, dst)
    return out.reshape(-1, dst * dst).t().contiguous().to(table.dtype)  # (dst², nH)


# transformers' SwinModel block names -> the official ones (spec §8.3); query/key/value are fused into qkv
SWIN_BLOCK_NAMES = {"layernorm_before.": "norm1.", "attention.output.dense.": "attn.proj.",
                    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
                    "layernorm_after.": "norm2.", "intermediate.dense.": "mlp.fc1.", "output.dense.": "mlp.fc2."}


def swin_from_transformers(state):
    """A transformers SwinModel (or SwinFor*: 'swin.' prefix) state dict in the official key names (spec §8.3)."""
    renamed, qkv = {}, {}
    for key, value in state.items():
        key = key.removeprefix("swin.")
        for old, new in (("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
                         ("embeddings.norm.", "patch_embed.norm."), ("encoder.layers.", "layers."),
                         ("layernorm.", "norm.")):
            if key.startswith(old):
                key = new + key[len(old):]
        stage, dot, rest = key.partition(".blocks.")
        if dot:
            block, _, name = rest.partition(".")
            if name.startswith(("attention.self.query.", "attention.self.key.", "attention.self.value.")):
                part, kind = name.split(".")[2:]
                qkv.setdefault(f"{stage}.blocks.{block}.attn.qkv.{kind}", {})[part] = value
                continue
            for old, new in SWIN_BLOCK_NAMES.items():
                if name.startswith(old):
                    key = f"{stage}.blocks.{block}.{new}{name[len(old):]}"
                    break
        renamed[key] = value
    for key, parts in qkv.items():  # rows: q, k, v (spec §8.2)
        if len(parts) == 3:
            renamed[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return renamed


def load_swin(model, path):
    """Load ImageNet Swin weights into model.vision_encoder (spec §1.2): Microsoft's .pth ({'model':
    state_dict}) or a transformers SwinModel folder (config.json + weights, names mapped as spec §8.3).
    Drops the classifier and the recomputed buffers, resizes every bias table to this geometry, strict otherwise."""
    if os.path.isdir(path):
        read_folder_config(path, "--swin")
        path, state = read_folder_weights(path)
        state = swin_from_transformers(state)
    else:
        if not os.path.isfile(path):
            fail(f"--swin {path}: no such file or folder")
        state = read_torch_file(path, "Swin weights")
        state = state.get("model", state) if isinstance(state, dict) else None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            fail(f"{path}: not a Swin state dict (or {{'model': state dict}}) of tensors")
    own = model.vision_encoder.state_dict()
    skipped, kept = Counter(), {}
    for key, value in state.items():
        if key.startswith(("head.", "classifier.")):
            skipped["ImageNet classifier dropped"] += 1
        elif "relative_position_index" in key or "attn_mask" in key or key == "embeddings.mask_token":
            skipped["recomputed buffers (relative_position_index, attn_mask) dropped"] += 1
        else:
            if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
                skipped["bias tables resized (not skipped)"] += 1
                value = resize_relative_position_bias_table(value, math.isqrt(own[key].shape[0]))
            kept[key] = value
    loaded = load_into(model.vision_encoder, kept, f"Swin weights from {path}")
    for what, count in skipped.items():
        print(f"load_swin: {what}: {count}")
    print(f"load_swin: {loaded} tensors from {path}")


# buffers of the official checkpoint that we recompute (spec §8.3, §11)
RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask", "embeddings.position_ids", "embeddings.token_type_ids")
TIED = {"text_encoder.cls.predictions.decoder.weight": "text_encoder.bert.embeddings.word_embeddings.weight",
        "text_encoder.cls.predictions.decoder.bias": "text_encoder.cls.predictions.bias"}


def load_state(model, state, name="checkpoint"):
    """Load our checkpoint, an official APTM one ({'model': sd, 'config': yaml dict}) or a bare state dict.

    Renames the old `text_encoder.` prefix to `text_encoder.bert.` (spec §5.3), drops the recomputed
    buffers, prints one line per category of skipped or changed key, fails with one line naming `name` and
    the keys on any other mismatch. Returns {category: count}.
    """
    state_dict = state["model"] if isinstance(state.get("model"), dict) else state
    report, kept = Counter(), {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
            report["DDP prefix 'module.' removed"] += 1
        if "text_encoder." in key and "bert." not in key and "cls" not in key:
            key = key.replace("text_encoder.", "text_encoder.bert.")
            report["renamed text_encoder. -> text_encoder.bert. (spec §5.3)"] += 1
        if any(buffer in key for buffer in RECOMPUTED_BUFFERS):
            report["recomputed buffers dropped"] += 1
        elif key.startswith("img_cls."):
            report["PA-100K ablation head img_cls.* dropped (spec §1.5)"] += 1
        else:
            kept[key] = value
    for tied, source in TIED.items():
        if tied not in kept and source in kept:
            kept[tied] = kept[source]
            report["tied MLM decoder filled from its source"] += 1
    report["tensors loaded"] = load_into(model, kept, name)
    for what, count in report.items():
        print(f"load_state: {what}: {count}")
    return dict(report)


def official_config(state_dict, saved, name="checkpoint"):
    """The APTMConfig of an official checkpoint. Its yaml config names the Swin and BERT JSON files
    (vision_config, text_config) but does not hold their contents, so the sizes come from the tensors'
    shapes (spec §8.2): Swin width, patch, depths, heads per stage (bias-table columns), window (stage-0
    table), MLP ratio; BERT vocabulary, width, FFN, positions, text and fusion layers (those with
    crossattention), heads = aptm-base's at its width, else width / 64 (every released BERT's head width);
    the projection width. The image size comes from the yaml's h and w, max_tokens from the yaml, the rest
    from aptm-base."""
    sd = {k.removeprefix("module.").replace("text_encoder.encoder.", "text_encoder.bert.encoder.")
          .replace("text_encoder.embeddings.", "text_encoder.bert.embeddings."): v for k, v in state_dict.items()}
    swin, bert = "vision_encoder.", "text_encoder.bert."
    needed = [swin + "patch_embed.proj.weight", swin + "layers.0.blocks.0.attn.relative_position_bias_table",
              swin + "layers.0.blocks.0.mlp.fc1.weight", bert + "embeddings.word_embeddings.weight",
              bert + "embeddings.position_embeddings.weight", bert + "encoder.layer.0.intermediate.dense.weight",
              "vision_proj.weight"]
    absent = [key for key in needed if key not in sd]
    if absent:
        fail(f"{name}: not an APTM state dict (no {', '.join(absent[:3])})")

    def count(key):  # consecutive indices i = 0, 1, ... with key.format(i) in the state dict
        i = 0
        while key.format(i) in sd:
            i += 1
        return i

    stages = count(swin + "layers.{}.blocks.0.norm1.weight")
    depths = tuple(count(f"{swin}layers.{i}.blocks.{{}}.norm1.weight") for i in range(stages))
    heads = tuple(sd[f"{swin}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(stages))
    layers = count(bert + "encoder.layer.{}.attention.self.query.weight")
    cross = sum(f"{bert}encoder.layer.{i}.crossattention.self.query.weight" in sd for i in range(layers))
    base = CONFIGS["aptm-base"]
    proj = sd[swin + "patch_embed.proj.weight"]  # (C, 3, patch, patch)
    vocab, width = sd[bert + "embeddings.word_embeddings.weight"].shape
    text_heads = base.num_attention_heads if width == base.hidden_size else max(1, width // 64)
    sizes = dict(
        swin_dim=proj.shape[0], patch_size=proj.shape[-1], depths=depths, num_heads=heads,
        window_size=(math.isqrt(sd[swin + "layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]) + 1) // 2,
        mlp_ratio=sd[swin + "layers.0.blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0],
        vocab_size=vocab, hidden_size=width, num_attention_heads=text_heads,
        intermediate_size=sd[bert + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd[bert + "embeddings.position_embeddings.weight"].shape[0],
        num_text_layers=layers - cross, num_cross_layers=cross,
        embed_dim=sd["vision_proj.weight"].shape[0],
    )
    if isinstance(saved, dict) and "h" in saved and "w" in saved:
        sizes["image_size"] = (saved["h"], saved["w"])
    if isinstance(saved, dict) and "max_tokens" in saved:  # e.g. 15 for PA-100K (spec §3.2)
        sizes["max_tokens"] = saved["max_tokens"]
    return replace(base, **sizes)


def build_from_checkpoint(ckpt, name="checkpoint"):
    """Rebuild a model from a checkpoint dict alone: ours (ckpt['config'] = asdict(APTMConfig)) or an
    official release (sizes from official_config). `name` (the file) is named in any error."""
    saved = ckpt.get("config")
    names = {f.name for f in fields(APTMConfig)}
    if isinstance(saved, dict) and saved and set(saved) <= names:
        config = APTMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    else:
        state_dict = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
        config = official_config(state_dict, saved, name)
    model = APTM(config)
    load_state(model, ckpt, name)
    return model
