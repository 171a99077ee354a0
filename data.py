"""The paper's data path for minAPTM: dataset readers, transforms, tokenizer, MLM masking, EDA, torch Datasets.

Spec sections: §1.3 (tokenizer without [SEP]), §2.4 (MLM masking), §3.1 (the 27 MALS attributes and their
0/1 polarity), §4.2–4.4 (processed and raw dataset formats, test-set structure), §4.6 (image transforms),
§4.7 (pre_caption, EDA).

Letters: B batch, L text tokens, M masked positions per row, V vocabulary size, K attributes (27 for MALS),
H×W image size.

One pipeline for synthetic and real data: synthetic.py writes its world in the OFFICIAL file formats (MALS
`*_attrs.json`, CUHK-PEDES `reid_raw.json` + `imgs/`, a PA-100K-style attribute JSON), so the readers here serve
both. Bad input never gives a traceback: `fail` prints one line naming the file, the entry and the fix, and exits
with status 2.

Public API:
    fail, read_checkpoint, load_model_and_tokenizer, check_images, NORMALIZATION,
    Tokenizer (from_corpus / from_bert_dir / from_state / state / __call__), mask_tokens, PromptMasking, pre_caption,
    eda, train_transform, test_transform, device_images, RandAugment, RandomErasing, read_mals, read_retrieval,
    load_retrieval, TestSet, read_attributes, PretrainDataset, FinetuneDataset, ImageDataset, AttributeDataset.
Randomness: transforms take a random.Random, mask_tokens a torch.Generator; the Datasets derive both from
(seed, epoch, sample index), so a run reproduces exactly with any number of workers and after a resume.

Deviations (documented, our choice): EDA's synonyms come from a small built-in table (`EDA_SYNONYMS`) instead of
NLTK WordNet (offline, no extra dependency); RandAugment's translation of 7 pixels is scaled by W/128 so it
keeps its relative size at small training resolutions (identical at the paper's 384×128).
"""
import glob
import json
import math
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from model import BadInput, build_from_checkpoint, fail, read_json, read_torch_file  # fail: `error: ...`, exit 2

# ----------------------------------------------------------------------------------------------------------
# Failing clearly


def read_checkpoint(path):
    """torch.load a checkpoint (ours or an official release) onto the CPU, failing clearly on a missing or
    unreadable file. A checkpoint is a pickle: load only files you trust (ours hold RNG states, not only tensors)."""
    if not os.path.isfile(path):
        fail(f"{path}: no such checkpoint")
    checkpoint = read_torch_file(path, "a torch checkpoint", weights_only=False)
    if not isinstance(checkpoint, dict):
        fail(f"{path}: not a checkpoint dict")
    return checkpoint


def load_model_and_tokenizer(path, bert_dir, device):
    """Rebuild the model and its tokenizer from a checkpoint file alone (DESIGN.md §3): ours carry the tokenizer;
    official APTM checkpoints carry none, so theirs comes from the BERT folder `bert_dir`."""
    checkpoint = read_checkpoint(path)
    if checkpoint.get("tokenizer") is not None:
        tokenizer = Tokenizer.from_state(checkpoint["tokenizer"])
    elif bert_dir is not None:
        tokenizer = Tokenizer.from_bert_dir(bert_dir)
    else:
        fail(f"{path} has no tokenizer (an official APTM checkpoint?): pass --bert DIR, a BERT folder with "
             "vocab.txt or tokenizer.json")
    model = build_from_checkpoint(checkpoint, path).to(device).eval()
    if tokenizer.vocab_size != model.config.vocab_size:
        fail(f"{path}: the model has {model.config.vocab_size} word embeddings but the vocabulary has "
             f"{tokenizer.vocab_size} entries")
    return model, tokenizer


def check_images(paths, source=""):
    """Fail unless every image file exists (os.path.exists only: fast enough for 1.5M MALS images)."""
    missing = [i for i, path in enumerate(paths) if not os.path.exists(path)]
    if missing:
        where = f"{source}: " if source else ""
        fail(f"{where}{len(missing)} of {len(paths)} image files are missing, the first is entry {missing[0]}: "
             f"{paths[missing[0]]}; check the image folder (--image-root or --data-root) and that the images "
             "were extracted")


def _load_json_list(path, what):
    """Read a JSON file holding a list (of dicts or of anything); fail clearly on every problem."""
    if not os.path.isfile(path):
        fail(f"{path}: {what} file not found; check the path (--ann, --data-root)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        fail(f"{path}: malformed JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
             f"re-download or regenerate the file")
    except UnicodeDecodeError:
        fail(f"{path}: not UTF-8 text; expected a JSON {what} file")
    if not isinstance(data, list):
        fail(f"{path}: expected a JSON list of objects ({what}), got {type(data).__name__}")
    return data


def _field(entry, key, path, index, kind=None):
    """entry[key] with a clear failure naming the file, the entry index and the fix."""
    if not isinstance(entry, dict):
        fail(f"{path}: entry {index} is a {type(entry).__name__}, expected a JSON object")
    if key not in entry:
        fail(f"{path}: entry {index} has no \"{key}\" field (keys: {sorted(entry)}); fix or remove the entry")
    value = entry[key]
    if kind is not None and not isinstance(value, kind):
        fail(f"{path}: entry {index}: \"{key}\" must be {getattr(kind, '__name__', kind)}, "
             f"got {type(value).__name__}")
    return value


def _caption(value, path, index):
    if not isinstance(value, str) or not value.strip():
        fail(f"{path}: entry {index} has an empty or non-text caption ({value!r}); fix or remove the entry")
    return value


# ----------------------------------------------------------------------------------------------------------
# Normalisation constants (spec §4.6; the only copy in minAPTM)

NORMALIZATION = {
    "mals": ((0.4416847, 0.41812873, 0.4237452), (0.3088255, 0.29743394, 0.301009)),
    "cuhk": ((0.38901278, 0.3651612, 0.34836376), (0.24344306, 0.23738699, 0.23368555)),
    "icfg": ((0.30941582, 0.28956893, 0.30347288), (0.25849792, 0.24547698, 0.2366199)),
    "rstp": ((0.27722597, 0.26065794, 0.3036557), (0.2609547, 0.2508087, 0.25293276)),
    "pa100k": ((0.46485138, 0.45038012, 0.4632019), (0.25088054, 0.24609283, 0.24240193)),
}
NORMALIZATION["synthetic"] = NORMALIZATION["cuhk"]  # our choice: the synthetic world stands in for CUHK-PEDES


# ----------------------------------------------------------------------------------------------------------
# Tokenizer (spec §1.3): [CLS] + word-pieces, no [SEP], pad with [PAD] = 0

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # offline vocab: [PAD] = 0 first


class Tokenizer:
    """BERT-uncased word-piece tokenizer that encodes one sequence as `[CLS] w1 … wn` (no [SEP]).

    The lower-casing, accent stripping and punctuation splitting are transformers' BertTokenizer (the same
    basic tokenizer as bert-base-uncased); only the vocabulary differs between `from_corpus` (offline,
    built from the captions and prompts) and `from_bert_dir` (that folder's vocab.txt or tokenizer.json:
    bert-base-uncased has CLS 101, MASK 103).
    """

    def __init__(self, vocab, do_lower_case=True):
        from transformers import BertTokenizer
        for token in SPECIAL_TOKENS:
            if token not in vocab:
                fail(f"tokenizer vocabulary lacks the special token {token}; use a BERT vocabulary")
        self.vocab = list(vocab)
        self.do_lower_case = do_lower_case
        token_to_id = {token: i for i, token in enumerate(self.vocab)}
        self._hf = BertTokenizer(vocab=token_to_id, do_lower_case=do_lower_case)
        self._backend = self._hf.backend_tokenizer
        self.pad_id = token_to_id["[PAD]"]
        self.cls_id = token_to_id["[CLS]"]
        self.mask_id = token_to_id["[MASK]"]
        self.unk_id = token_to_id["[UNK]"]
        self.vocab_size = len(self.vocab)
        self.is_subword = torch.tensor([t.startswith("##") for t in self.vocab], dtype=torch.bool)  # (V,)

    @classmethod
    def from_corpus(cls, texts):
        """Word-level vocab from `texts` (pass the captions AND the attribute prompts): the specials, single
        characters and common punctuation, the letters' and digits' ## forms (so any word can be spelled),
        then every basic-tokenizer word of `texts` and of the EDA synonym table, sorted."""
        from transformers import BertTokenizer
        basic = BertTokenizer(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS)}).backend_tokenizer
        words = set()
        for text in list(texts) + [" ".join(v) + " " + k for k, v in EDA_SYNONYMS.items()]:
            normalized = basic.normalizer.normalize_str(text)
            words.update(w for w, _ in basic.pre_tokenizer.pre_tokenize_str(normalized))
        chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&") | {w for w in words if len(w) == 1})
        pieces = chars + ["##" + c for c in chars if c.isalnum()]
        vocab = SPECIAL_TOKENS + pieces + sorted(words - set(pieces) - set(SPECIAL_TOKENS))
        return cls(vocab)

    @classmethod
    def from_bert_dir(cls, path):
        """The vocabulary of a BERT folder: vocab.txt (uncased), or else tokenizer.json, what transformers'
        fast BERT tokenizer saves (a WordPiece vocabulary; lower-casing as its normalizer says)."""
        vocab_file, json_file = os.path.join(path, "vocab.txt"), os.path.join(path, "tokenizer.json")
        if os.path.isfile(vocab_file):
            with open(vocab_file, encoding="utf-8") as f:
                return cls([line.rstrip("\n") for line in f])
        if not os.path.isfile(json_file):
            fail(f"{path}: neither vocab.txt nor tokenizer.json; --bert needs a BERT folder with its tokenizer")
        saved = read_json(json_file)
        model = saved.get("model") if isinstance(saved, dict) else None
        if not isinstance(model, dict) or model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            fail(f"{json_file}: not a WordPiece (BERT) tokenizer")
        ids = sorted(model["vocab"].items(), key=lambda item: item[1])
        if [i for _, i in ids] != list(range(len(ids))):
            fail(f"{json_file}: the vocabulary ids are not 0..{len(ids) - 1}")
        normalizer = saved.get("normalizer") or {}
        return cls([token for token, _ in ids], do_lower_case=bool(normalizer.get("lowercase", True)))

    def __getstate__(self):  # pickled (e.g. into spawned DataLoader workers) as its small state
        return self.state()

    def __setstate__(self, state):
        self.__init__(state["vocab"], state.get("do_lower_case", True))

    def state(self):
        """Small dict stored in checkpoints (rebuilds the tokenizer offline)."""
        return {"vocab": list(self.vocab), "do_lower_case": self.do_lower_case}

    @classmethod
    def from_state(cls, state):
        return cls(state["vocab"], state.get("do_lower_case", True))

    def tokenize(self, text):
        return self._backend.encode(text, add_special_tokens=False).tokens

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids if i != self.pad_id).replace(" ##", "")

    def __call__(self, texts, max_length, padding="max_length"):
        """texts → (input_ids (B, L) long, attention_mask (B, L) long), L = max_length or the longest row.

        Spec §1.3: at most max_length − 1 word-pieces are kept, [CLS] is prepended, no [SEP], [PAD] = pad_id
        fills; the mask is 1 on [CLS] and the pieces.
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("max_length", "longest"):
            fail(f"tokenizer padding must be 'max_length' or 'longest', got {padding!r}")
        rows = [[self.cls_id] + self._backend.encode(text, add_special_tokens=False).ids[:max_length - 1]
                for text in texts]  # one encode per text: no Rust thread pool, so forking workers stays quiet
        length = max_length if padding == "max_length" else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
        for b, row in enumerate(rows):
            input_ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, :len(row)] = 1
        return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------
# MLM masking (spec §2.4; official dataset/re_dataset.py TextMaskingGenerator)


def mask_tokens(input_ids, tokenizer, generator, mask_prob=0.25, max_masks=10, skipgram_prb=0.2,
                skipgram_size=3, whole_word=True):
    """Mask each row of a padded batch exactly as the official TextMaskingGenerator (spec §2.4).

    input_ids (B, L) with [CLS] at position 0 → masked_ids (B, L), masked_pos (B, M), masked_labels (B, M),
    M = max_masks. Positions 1..L−1 are all candidates, [PAD] included; n_pred = min(max_masks,
    max(1, round(L·mask_prob))) on the padded length L with Python's banker's round. Padding: masked_pos 0,
    masked_labels −100. Selected positions are listed in increasing order (the official order is a set's;
    the loss does not depend on it). All randomness comes from `generator` (a torch.Generator; None = the
    global torch RNG).
    """
    batch_size, length = input_ids.shape
    n_pred = min(max_masks, max(1, int(round(length * mask_prob))))
    is_subword = tokenizer.is_subword
    masked_ids = input_ids.clone()  # (B, L)
    masked_pos = torch.zeros((batch_size, max_masks), dtype=torch.long)  # (B, M)
    masked_labels = torch.full((batch_size, max_masks), -100, dtype=torch.long)  # (B, M)
    last_cand = length - 1
    for b in range(batch_size):
        ids = input_ids[b].tolist()
        sub = is_subword[input_ids[b]].tolist()  # sub[p]: token p starts with "##"
        order = (torch.randperm(length - 1, generator=generator) + 1).tolist()  # candidates 1..L−1, shuffled
        use_span = (torch.rand(length - 1, generator=generator) < skipgram_prb).tolist()
        span_len = torch.randint(2, max(2, skipgram_size) + 1, (length - 1,), generator=generator).tolist()
        chosen = set()
        for i, pos in enumerate(order):
            if len(chosen) >= n_pred:
                break
            if pos in chosen:
                continue
            start, end = pos, pos + (span_len[i] if (skipgram_size >= 2 and use_span[i]) else 1)
            if whole_word:  # expand to whole words: left while the token is "##…", right while the next is
                while start >= 0 and sub[start]:
                    start -= 1
                while end < length and sub[end]:
                    end += 1
            for p in range(start, end):
                if not 0 < p <= last_cand:
                    break
                chosen.add(p)
        chosen = sorted(chosen)
        if len(chosen) > n_pred:  # keep a random subset of n_pred
            keep = torch.randperm(len(chosen), generator=generator)[:n_pred].tolist()
            chosen = sorted(chosen[k] for k in keep)
        u_mask = torch.rand(len(chosen), generator=generator).tolist()
        u_random = torch.rand(len(chosen), generator=generator).tolist()
        random_ids = torch.randint(0, tokenizer.vocab_size, (len(chosen),), generator=generator).tolist()
        for j, p in enumerate(chosen):
            masked_pos[b, j] = p
            masked_labels[b, j] = ids[p]
            if u_mask[j] < 0.8:  # 80% [MASK]
                masked_ids[b, p] = tokenizer.mask_id
            elif u_random[j] < 0.5:  # 10% a random id in [0, V) (specials included), 10% unchanged
                masked_ids[b, p] = random_ids[j]
    return masked_ids, masked_pos, masked_labels


# ----------------------------------------------------------------------------------------------------------
# Text preprocessing (spec §4.7)


def clean_caption(caption):
    """ICFG/RSTP cleaning: lower-case, runs of characters outside [0-9a-z] → one space, strip."""
    return re.sub(r"\s{2,}", " ", re.sub(r"[^0-9a-z]+", " ", caption.lower())).strip(" ")


def pre_caption(caption, max_words=56, clean=False, eda_rng=None):
    """Spec §4.7: optional ICFG/RSTP cleaning, optional EDA (when `eda_rng` is given), truncation to
    `max_words` words (split on single spaces, as the official code). An empty result is an error."""
    if clean:
        caption = clean_caption(caption)
    if eda_rng is not None:
        caption = eda(caption, eda_rng)
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    if not caption.strip():
        raise ValueError("pre_caption yields an empty caption")
    return caption


# EDA's standard English stop-word list (Wei & Zou, eda.py), '' included.
EDA_STOP_WORDS = set(
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers "
    "herself it its itself they them their theirs themselves what which who whom this that these those am is "
    "are was were be been being have has had having do does did doing a an the and but if or because as until "
    "while of at by for with about against between into through during before after above below to from up "
    "down in out on off over under again further then once here there when where why how all any both each few "
    "more most other some such no nor not only own same so than too very s t can will just don should now"
    .split()) | {""}

# Offline synonym source for EDA (deviation from WordNet, documented in the module docstring): a small table
# for the person/clothing vocabulary. Lookup is symmetric within each group.
_SYNONYM_GROUPS = [
    "man guy gentleman male", "woman lady female", "girl lass", "boy lad", "child kid youngster",
    "person individual pedestrian someone", "wearing sporting donning", "wears sports dons",
    "carrying holding toting", "carries holds totes", "shirt top tee", "jacket coat", "sweater jumper pullover",
    "pants trousers slacks", "jeans denims", "skirt kilt", "dress gown frock", "shoes footwear",
    "sneakers trainers", "boots booties", "hat cap", "backpack knapsack rucksack", "handbag purse",
    "bag satchel", "hair locks", "long lengthy", "short brief", "black dark", "white pale", "red crimson",
    "blue azure", "green emerald", "gray grey", "brown tan", "purple violet", "yellow golden", "pink rosy",
    "walking strolling", "slim thin slender", "heavy stout chubby", "tall lanky", "small little",
    "big large", "young youthful", "shoulder shoulders", "looks appears", "has owns",
]
EDA_SYNONYMS = {}
for _group in _SYNONYM_GROUPS:
    _words = _group.split()
    for _w in _words:
        EDA_SYNONYMS[_w] = [v for v in _words if v != _w]


def _eda_clean(line):
    """EDA get_only_chars: drop apostrophes, hyphens/tabs/newlines → space, lower, keep [a-z ] only."""
    line = line.replace("’", "").replace("'", "").replace("-", " ").replace("\t", " ").replace("\n", " ")
    line = "".join(c if c in "abcdefghijklmnopqrstuvwxyz " else " " for c in line.lower())
    return re.sub(" +", " ", line).lstrip(" ")


def eda(sentence, rng, alpha_sr=0.1, alpha_ri=0.1, alpha_rs=0.1, p_rd=0.1):
    """One EDA augmentation (spec §4.7, num_aug = 1): build one SR, RI, RS and RD candidate, clean each,
    shuffle the four and return the first. `rng` is a random.Random."""
    sentence = _eda_clean(sentence)
    words = [w for w in sentence.split(" ") if w != ""]
    if not words:
        return sentence
    n = len(words)
    candidates = [
        _synonym_replacement(words, max(1, int(alpha_sr * n)), rng),
        _random_insertion(words, max(1, int(alpha_ri * n)), rng),
        _random_swap(words, max(1, int(alpha_rs * n)), rng),
        _random_deletion(words, p_rd, rng),
    ]
    candidates = [_eda_clean(" ".join(c)) for c in candidates]
    rng.shuffle(candidates)
    return candidates[0]


def _synonym_replacement(words, n, rng):
    new_words = list(words)
    pool = sorted(set(w for w in words if w not in EDA_STOP_WORDS))
    rng.shuffle(pool)
    replaced = 0
    for word in pool:
        synonyms = EDA_SYNONYMS.get(word, [])
        if synonyms:
            synonym = rng.choice(synonyms)
            new_words = [synonym if w == word else w for w in new_words]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(new_words).split(" ")


def _random_insertion(words, n, rng):
    new_words = list(words)
    for _ in range(n):
        synonyms, tries = [], 0
        while not synonyms:
            synonyms = EDA_SYNONYMS.get(new_words[rng.randint(0, len(new_words) - 1)], [])
            tries += 1
            if tries >= 10:
                break
        if synonyms:
            new_words.insert(rng.randint(0, len(new_words) - 1), synonyms[0])
    return new_words


def _random_swap(words, n, rng):
    new_words = list(words)
    for _ in range(n):
        i = rng.randint(0, len(new_words) - 1)
        j, tries = i, 0
        while j == i and tries <= 3:
            j = rng.randint(0, len(new_words) - 1)
            tries += 1
        new_words[i], new_words[j] = new_words[j], new_words[i]
    return new_words


def _random_deletion(words, p, rng):
    if len(words) == 1:
        return list(words)
    kept = [w for w in words if rng.uniform(0, 1) > p]
    return kept if kept else [words[rng.randint(0, len(words) - 1)]]


# ----------------------------------------------------------------------------------------------------------
# Image transforms without torchvision (spec §4.6). Each transform is called as t(image, rng) with a
# random.Random; rng=None uses the module `random` (which DataLoader seeds per worker).

RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
RANDAUG_FILL = (128, 128, 128)  # official replace value for geometric ops


class RandAugment:
    """RandomAugment(N=2, M=7) of the official code (spec §4.6): N ops drawn with replacement, each applied
    with probability 0.5 at level M of 10 (Brightness/Sharpness ×1.36, shear ±0.21, translate ±7 px at
    W = 128, rotate ±21°)."""

    def __init__(self, num_ops=2, magnitude=7, max_level=10):
        self.num_ops, self.level = num_ops, magnitude / max_level

    def __call__(self, image, rng=None):
        rng = rng or random
        for name in [RANDAUG_OPS[rng.randrange(len(RANDAUG_OPS))] for _ in range(self.num_ops)]:
            if rng.random() > 0.5:
                continue
            image = self.apply(image, name, rng)
        return image

    def apply(self, image, name, rng=None):
        rng = rng or random
        sign = 1 if rng.random() > 0.5 else -1
        width, height = image.size
        if name == "Identity":
            return image
        if name == "AutoContrast":
            return ImageOps.autocontrast(image, cutoff=0)
        if name == "Equalize":
            return ImageOps.equalize(image)
        if name == "Brightness":  # pixels × (0.7·1.8 + 0.1) through a clipped LUT
            factor = self.level * 1.8 + 0.1
            return image.point([min(255, int(v * factor)) for v in range(256)] * 3)
        if name == "Sharpness":
            return ImageEnhance.Sharpness(image).enhance(self.level * 1.8 + 0.1)
        if name in ("ShearX", "ShearY"):
            shear = sign * self.level * 0.3
            matrix = (1, shear, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, shear, 1, 0)
            return image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR,
                                   fillcolor=RANDAUG_FILL)
        if name in ("TranslateX", "TranslateY"):
            shift = sign * self.level * 10 * width / 128  # 7 px at the paper's width 128 (our scaling)
            matrix = (1, 0, shift, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, shift)
            return image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR,
                                   fillcolor=RANDAUG_FILL)
        if name == "Rotate":
            return image.rotate(sign * self.level * 30, Image.Resampling.BILINEAR, fillcolor=RANDAUG_FILL)
        raise ValueError(f"unknown RandAugment op {name}")


class RandomErasing:
    """Random erasing (spec §4.6): with probability p, up to 100 attempts at a rectangle of area
    U(0.02, 0.4)·H·W and aspect U(0.3, 1/0.3); h = round(√(area·r)), w = round(√(area/r)), h < H, w < W;
    fill 0 (the dataset mean after normalisation)."""

    def __init__(self, p=0.6, area=(0.02, 0.4), aspect=0.3, attempts=100, value=0.0):
        self.p, self.area, self.aspect, self.attempts, self.value = p, area, aspect, attempts, value

    def draw(self, height, width, rng=None):
        """The rectangle (top, left, h, w) to erase in an image of height x width, or (0, 0, 0, 0) for none."""
        rng = rng or random
        if rng.uniform(0, 1) >= self.p:
            return 0, 0, 0, 0
        for _ in range(self.attempts):
            target_area = rng.uniform(*self.area) * height * width
            ratio = rng.uniform(self.aspect, 1 / self.aspect)
            h = int(round(math.sqrt(target_area * ratio)))
            w = int(round(math.sqrt(target_area / ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return top, left, h, w
        return 0, 0, 0, 0

    def __call__(self, image, rng=None):  # image (3, H, W) float tensor or array, erased in place
        top, left, h, w = self.draw(*image.shape[1:], rng)
        image[:, top:top + h, left:left + w] = self.value
        return image


class ImageTransform:
    """Resize (bicubic) → [flip 0.5 → RandAugment(N, 7)] → ToTensor+Normalize → [RandomErasing] (spec §4.6).
    N = 2 as in the paper; 0 switches RandAugment off (the tiny preset).
    Call as transform(pil_image, rng=None) → (3, H, W) float tensor.

    Training data goes through the DataLoader as uint8 (`for_device`: 4x smaller than float32, and the
    workers skip the float work): the workers run everything up to the uint8 pixels and draw the erasing
    rectangle with the same random numbers, in the same order; `device_images` normalises and erases on
    the device, to the same values as calling the transform (our choice)."""

    def __init__(self, image_size, normalization, train, erasing_p=0.6, randaugment_ops=2):
        if isinstance(normalization, str):
            if normalization not in NORMALIZATION:
                fail(f"unknown normalization {normalization!r}; choose one of {sorted(NORMALIZATION)}")
            normalization = NORMALIZATION[normalization]
        self.height, self.width = image_size
        self.mean, self.std = normalization
        self.train = train
        self.randaugment = RandAugment(randaugment_ops, 7)
        self.erasing = RandomErasing(erasing_p)

    def for_device(self, image, rng=None):
        """dict(image (3, H, W) uint8, erase (4,) long: top, left, h, w of the rectangle to erase (h = 0: none),
        norm (2, 3) float32: mean and std), the input of `device_images`."""
        rng = rng or random
        image = image.convert("RGB").resize((self.width, self.height), Image.Resampling.BICUBIC)
        if self.train:
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = self.randaugment(image, rng)
        erase = self.erasing.draw(self.height, self.width, rng) if self.train and self.erasing.p > 0 else (0,) * 4
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())  # (3, H, W)
        return {"image": pixels, "erase": torch.tensor(erase, dtype=torch.long),
                "norm": torch.tensor((self.mean, self.std), dtype=torch.float32)}

    def __call__(self, image, rng=None):
        sample = self.for_device(image, rng)
        return device_images(*(sample[key][None] for key in ("image", "erase", "norm")), self.erasing.value)[0]


def device_images(images, erase, norm, fill=0.0):
    """The end of the train transform, on the batch's device (spec §4.6): ToTensor+Normalize, then the erasing.

        x = (u / 255 − mean) / std,   computed as u · (1 / (255·std)) − mean / std in fp32
        x[:, top:top+h, left:left+w] = fill (0.0, the dataset mean)

    images (B, 3, H, W) uint8, erase (B, 4) long, norm (B, 2, 3) float32 (from ImageTransform.for_device)
    → (B, 3, H, W) float32. Fixed shapes, no host sync.
    """
    _, _, height, width = images.shape
    mean, std = norm[:, 0, :, None, None], norm[:, 1, :, None, None]  # (B, 3, 1, 1)
    x = images.float() * (1 / (255 * std)) - mean / std  # (B, 3, H, W)
    top, left, h, w = (e[:, None, None] for e in erase.unbind(1))  # (B, 1, 1) each
    rows = torch.arange(height, device=images.device)[None, :, None]  # (1, H, 1)
    cols = torch.arange(width, device=images.device)[None, None, :]  # (1, 1, W)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
    return x.masked_fill(inside[:, None], fill)


def train_transform(image_size, normalization, erasing_p=0.6, randaugment_ops=2):
    return ImageTransform(image_size, normalization, train=True, erasing_p=erasing_p, randaugment_ops=randaugment_ops)


def test_transform(image_size, normalization):
    return ImageTransform(image_size, normalization, train=False)


def load_image(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        fail(f"{path}: image file not found; check the image root")
    except OSError as error:
        fail(f"{path}: cannot read the image ({error}); re-extract the dataset")


# ----------------------------------------------------------------------------------------------------------
# Readers (spec §4.2–4.4)

MALS_NUM_ATTRIBUTES = 27  # spec §3.1
RETRIEVAL_SPLITS = {"cuhk": ("train", "val", "test"), "icfg": ("train", "test"), "rstp": ("train", "val", "test"),
                    "synthetic": ("train", "val", "test")}
CLEAN_TEST_CAPTIONS = {"cuhk": False, "icfg": True, "rstp": True, "synthetic": False}  # spec §4.7 icfg_rstp


@dataclass
class TestSet:
    """A retrieval val/test split (spec §4.4): the gallery in file order and all captions in file order."""
    image_paths: list  # G gallery images
    g_pids: list  # G person ids (int)
    captions: list  # Q captions, pre_caption'd (cleaned for ICFG/RSTP)
    q_pids: list  # Q person ids of the captions' images


def _expand_paths(ann_paths_or_globs):
    if isinstance(ann_paths_or_globs, str):
        ann_paths_or_globs = [ann_paths_or_globs]
    paths = []
    for pattern in ann_paths_or_globs:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            fail(f"{pattern}: no annotation file matches this pattern; check the path")
        paths += matches
    return paths


def _check_label(label, path, index, num_attributes, allowed):
    if not isinstance(label, list) or len(label) != num_attributes:
        size = len(label) if isinstance(label, list) else type(label).__name__
        fail(f"{path}: entry {index}: \"label\" must be a list of {num_attributes} ints, got {size}; "
             f"regenerate the annotation file")
    if any(v not in allowed for v in label) or any(isinstance(v, bool) for v in label):
        fail(f"{path}: entry {index}: \"label\" values must be in {sorted(allowed)}, got {label}")
    return label


def read_mals(ann_paths_or_globs, image_root, check=True):
    """MALS `*_attrs.json` files (spec §4.2) → list of dicts {"image": path, "caption", "pid", "label"}.

    `image_id` is unique per image in MALS and is the ITC/ITM identity; pids are remapped to 0..N−1 by first
    appearance. `label` has 27 values in {1, 0, −1} (spec §3.1)."""
    entries, pid_of = [], {}
    for path in _expand_paths(ann_paths_or_globs):
        for i, entry in enumerate(_load_json_list(path, "MALS annotation")):
            image = _field(entry, "image", path, i, str)
            caption = _caption(_field(entry, "caption", path, i), path, i)
            image_id = _field(entry, "image_id", path, i)
            label = _check_label(_field(entry, "label", path, i), path, i, MALS_NUM_ATTRIBUTES, {-1, 0, 1})
            pid = pid_of.setdefault(image_id, len(pid_of))
            entries.append({"image": os.path.join(image_root, image), "caption": caption, "pid": pid,
                            "label": label})
    if not entries:
        fail(f"{ann_paths_or_globs}: the MALS annotation files hold no entries")
    if check:
        check_images([e["image"] for e in entries], "MALS")
    return entries


def _default_retrieval_file(dataset, data_root, split):
    if dataset == "synthetic":  # the layout synthetic.make_synthetic writes
        path = os.path.join(data_root, "cuhk", "reid_raw.json")
        if not os.path.isfile(path):
            fail(f"{data_root}: no synthetic world here ({path} is missing); make it with "
                 f"`python synthetic.py --root {data_root}`")
        return path
    raw = {"cuhk": "reid_raw.json", "icfg": "ICFG-PEDES.json", "rstp": "data_captions.json"}[dataset]
    candidates = [os.path.join(data_root, raw), os.path.join(data_root, f"{dataset}_{split}.json"),
                  os.path.join(data_root, "finetune", f"{dataset}_{split}.json")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    fail(f"{data_root}: found none of {', '.join(candidates)}; point --data-root at the {dataset} folder "
         f"(official {raw} + imgs/, or APTM's processed {dataset}_{split}.json)")


def _pick_image_root(first_image, candidates):
    for root in candidates:
        if os.path.exists(os.path.join(root, first_image)):
            return root
    return candidates[0]


def load_retrieval(dataset, data_root, split, image_root=None, max_words=56, check=True):
    """read_retrieval on a dataset folder, knowing each dataset's default file names: the official raw file
    (reid_raw.json, ICFG-PEDES.json, data_captions.json) or APTM's processed {dataset}_{split}.json.
    "synthetic" reads data_root/cuhk/reid_raw.json (synthetic.synthetic_world makes it). A file path is read as it
    is."""
    if dataset not in RETRIEVAL_SPLITS:
        fail(f"unknown retrieval dataset {dataset!r}; choose one of {sorted(RETRIEVAL_SPLITS)}")
    if data_root is None:
        data_root = "data/synthetic" if dataset == "synthetic" else f"data/{dataset}"
    if os.path.isfile(data_root):  # a file given directly
        return read_retrieval(dataset, data_root, split, image_root=image_root, max_words=max_words, check=check)
    if dataset != "synthetic" and not os.path.isdir(data_root):
        fail(f"{data_root}: no such folder; pass --data-root pointing at the {dataset} data")
    path = _default_retrieval_file(dataset, data_root, split)
    return read_retrieval(dataset, path, split, image_root=image_root, max_words=max_words, check=check)


def read_retrieval(dataset, path, split, image_root=None, max_words=56, check=True):
    """A retrieval split of CUHK-PEDES / ICFG-PEDES / RSTPReid / the synthetic world (spec §4.2–4.4).

    `path` is a data folder (→ load_retrieval), an official raw file (reid_raw.json, ICFG-PEDES.json,
    data_captions.json; the format is recognised from its fields) or APTM's processed {dataset}_{split}.json.
    train → list of (image_path, caption, pid), one per caption, pid 0..N−1 by first appearance, captions raw
    (the dataset applies pre_caption). val/test → TestSet, captions pre_caption'd (cleaned for icfg/rstp)."""
    if dataset not in RETRIEVAL_SPLITS:
        fail(f"unknown retrieval dataset {dataset!r}; choose one of {sorted(RETRIEVAL_SPLITS)}")
    if split not in RETRIEVAL_SPLITS[dataset]:
        fail(f"unknown split {split!r} for {dataset}; choose one of {RETRIEVAL_SPLITS[dataset]}"
             + (" (ICFG-PEDES has no val split)" if dataset == "icfg" and split == "val" else ""))
    if os.path.isdir(path):
        return load_retrieval(dataset, path, split, image_root, max_words, check)
    data = _load_json_list(path, f"{dataset} annotation")
    if not data:
        fail(f"{path}: the annotation file holds no entries")
    first = data[0] if isinstance(data[0], dict) else {}
    folder = os.path.dirname(os.path.abspath(path))
    # (image, captions, person id) per image of the split, in file order
    items = []
    if "file_path" in first or "img_path" in first:  # official raw format (spec §4.3)
        image_key = "file_path" if "file_path" in first else "img_path"
        for i, entry in enumerate(data):
            entry_split = _field(entry, "split", path, i, str)
            if entry_split not in ("train", "val", "test"):
                fail(f"{path}: entry {i} has an unknown split {entry_split!r}; expected train, val or test")
            if entry_split != split:
                continue
            captions = _field(entry, "captions", path, i, list)
            if not captions:
                fail(f"{path}: entry {i} has an empty caption list; fix or remove the entry")
            captions = [_caption(c, path, i) for c in captions]
            items.append((_field(entry, image_key, path, i, str), captions, _field(entry, "id", path, i)))
        if image_root is None:
            image_root = os.path.join(folder, "imgs")
    else:  # APTM processed json (spec §4.2)
        for i, entry in enumerate(data):
            caption = _field(entry, "caption", path, i)
            if isinstance(caption, list):
                if not caption:
                    fail(f"{path}: entry {i} has an empty caption list; fix or remove the entry")
                captions = [_caption(c, path, i) for c in caption]
            else:
                captions = [_caption(caption, path, i)]
            if split != "train" and dataset == "icfg":
                captions = captions[:1]  # re_test_dataset_icfg uses caption[0] only (spec §4.2)
            items.append((_field(entry, "image", path, i, str), captions, _field(entry, "image_id", path, i)))
        if image_root is None and items:
            image_root = _pick_image_root(items[0][0], [folder, os.path.join(folder, "imgs")])
    if not items:
        fail(f"{path}: no entries for split {split!r}; check the file and the split name")
    for i, (_, _, person) in enumerate(items):
        if not isinstance(person, (int, str)) or isinstance(person, bool):
            fail(f"{path}: entry {i}: the person id must be an int or a string, got {person!r}")
    image_paths = [os.path.join(image_root, image) for image, _, _ in items]
    if check:
        check_images(image_paths, path)
    if split == "train":
        pid_of = {}
        return [(image_path, caption, pid_of.setdefault(person, len(pid_of)))
                for image_path, (_, captions, person) in zip(image_paths, items) for caption in captions]
    numeric = all(isinstance(p, int) or str(p).lstrip("-").isdigit() for _, _, p in items)
    pid_of = {}
    pids = [int(p) if numeric else pid_of.setdefault(p, len(pid_of)) for _, _, p in items]
    clean = CLEAN_TEST_CAPTIONS[dataset]
    captions, q_pids = [], []
    for j, (_, item_captions, _) in enumerate(items):
        for caption in item_captions:
            try:
                captions.append(pre_caption(caption, max_words, clean=clean))
            except ValueError:
                fail(f"{path}: entry {j}: a caption is empty after cleaning ({caption!r}); fix the entry")
            q_pids.append(pids[j])
    return TestSet(image_paths, pids, captions, q_pids)


def read_attributes(path, image_root=None, split="test", check=True):
    """Attribute-recognition split → list of (image_path, label list).

    `path`: APTM's PA100K_{split}.json (26 labels, spec §4.2), a PA-100K annotation.mat (HydraPlus-Net
    release; needs scipy), a folder holding either, or the synthetic world's attr_{split}.json (27 full MALS
    labels) or its attributes/ folder. Labels are in {0, 1}; all rows must have the same length
    (26 or 27)."""
    source = path
    if os.path.isdir(source):
        candidates = [os.path.join(source, f"PA100K_{split}.json"), os.path.join(source, "annotation.mat"),
                      os.path.join(source, f"attr_{split}.json")]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            fail(f"{source}: found none of {', '.join(candidates)}; point at the PA-100K folder")
        source = found[0]
    folder = os.path.dirname(os.path.abspath(source))
    if source.endswith(".mat"):
        items = _read_pa100k_mat(source, split)
        if image_root is None:
            image_root = _pick_image_root(items[0][0], [os.path.join(folder, "release_data", "release_data"),
                                                        os.path.join(folder, "release_data"), folder])
    else:
        data = _load_json_list(source, "attribute annotation")
        if not data:
            fail(f"{source}: the attribute file holds no entries")
        first_label = _field(data[0], "label", source, 0)
        size = len(first_label) if isinstance(first_label, list) else -1
        if size not in (26, 27):
            fail(f"{source}: entry 0: \"label\" must hold 26 (PA-100K) or 27 (MALS) values, got {size}")
        items = [(_field(e, "image", source, i, str), _check_label(_field(e, "label", source, i), source, i,
                                                                   size, {0, 1}))
                 for i, e in enumerate(data)]
        if image_root is None:
            image_root = _pick_image_root(items[0][0], [folder, os.path.join(folder, "release_data")])
    entries = [(os.path.join(image_root, image), label) for image, label in items]
    if check:
        check_images([e[0] for e in entries], source)
    return entries


def _read_pa100k_mat(path, split):
    try:
        from scipy.io import loadmat
    except ImportError:
        fail(f"{path}: reading annotation.mat needs scipy (pip install scipy), or use APTM's PA100K_{split}.json")
    if split not in ("train", "val", "test"):
        fail(f"unknown split {split!r} for PA-100K; choose train, val or test")
    try:
        mat = loadmat(path)
    except Exception as error:  # scipy raises several types for a broken file
        fail(f"{path}: cannot read the .mat file ({error}); re-download annotation.mat")
    names_key, label_key = f"{split}_images_name", f"{split}_label"
    if names_key not in mat or label_key not in mat:
        fail(f"{path}: has no {names_key}/{label_key}; expected the HydraPlus-Net PA-100K annotation.mat")
    names = [str(np.asarray(n).ravel()[0]) for n in np.asarray(mat[names_key]).ravel()]
    labels = np.asarray(mat[label_key]).astype(int)
    if labels.shape != (len(names), 26):
        fail(f"{path}: {label_key} has shape {labels.shape}, expected ({len(names)}, 26)")
    return [(name, [int(v) for v in row]) for name, row in zip(names, labels)]


# ----------------------------------------------------------------------------------------------------------
# torch Datasets. Tokenising and masking run in __getitem__, i.e. in the DataLoader workers (spec §2.4).


def default_workers(device):
    """Data-loader processes when the command names none: on a GPU they decode, augment and mask while the GPU
    computes (6); on a CPU they would take the cores the model's threads spin on (measured: 10-30x slower steps),
    so there the main process loads the data itself (0)."""
    return 6 if torch.device(device).type == "cuda" else 0


class Loader(torch.utils.data.DataLoader):
    """A DataLoader that stops on bad input met in its worker processes as the main process does (model.fail):
    the worker has printed the `error: ...` line, and the run ends with status 2, without a traceback."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except BadInput:
            raise SystemExit(2) from None


def _fields(entry, keys):
    """An entry's fields in `keys` order, from a dict (read_mals) or a tuple (read_retrieval, read_attributes)."""
    return tuple(entry[k] for k in keys) if isinstance(entry, dict) else tuple(entry)


class PromptMasking:
    """The attribute prompts of a table (spec §3.1) tokenised once, padded to the longest (spec §2.5), and a fresh
    masking of all of them, as captions are masked (spec §2.4, §2.7), each time it is called."""

    def __init__(self, tokenizer, prompts, max_tokens):
        self.tokenizer = tokenizer
        self.prompt_ids, self.prompt_atts = tokenizer(list(prompts), max_length=max_tokens, padding="longest")  # (P, L)

    def __call__(self, generator):
        """-> prompt_masked_ids (P, L), prompt_masked_pos (P, M), prompt_masked_labels (P, M)."""
        return mask_tokens(self.prompt_ids, self.tokenizer, generator)


PROMPT_MASK_KEYS = ("prompt_masked_ids", "prompt_masked_pos", "prompt_masked_labels")


def split_prompt_rows(rows, batch_size):
    """(P, ...) -> (B, r, ...), r = ⌈P / B⌉, zero rows padding the end: one batch-level tensor as B per-sample ones,
    so that default_collate can carry it (_SampleRandom.__getitems__)."""
    per_sample = -(-rows.shape[0] // batch_size)
    padded = rows.new_zeros((batch_size * per_sample, *rows.shape[1:]))  # (B·r, ...)
    padded[:rows.shape[0]] = rows
    return padded.unflatten(0, (batch_size, per_sample))


def join_prompt_rows(rows, num_prompts):
    """The inverse of split_prompt_rows: (B, r, ...) collated rows -> (P, ...)."""
    return rows.flatten(0, 1)[:num_prompts]


class _SampleRandom:
    """Randomness of one sample, derived from (seed, epoch, index) alone: the same augmentation and masks whatever
    the number of DataLoader workers and wherever a resumed run restarts (exact resume); a new draw every epoch.
    The training loop's sampler passes the epoch with the indices (pretrain.RunBatches); otherwise call set_epoch.

    With a `prompt_masking` (PromptMasking), each batch also carries one masking of every attribute prompt for
    MAM (spec §2.7), drawn in the DataLoader worker that loads the batch instead of in the training process, from
    (seed, epoch, the batch's first index), so it too survives a resume exactly."""
    seed = 0
    epoch = 0
    prompt_masking = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _rngs(self, index, stream=()):
        entropy = [self.seed, self.epoch, index, *stream]
        mixed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        return random.Random(mixed), torch.Generator().manual_seed(mixed)

    def __getitems__(self, indices):
        """The samples of one batch (the DataLoader's batched fetch), plus the batch's prompt masking if any.
        Indices given as (epoch, index) pairs (pretrain.RunBatches, whose workers outlive an epoch) set the epoch.

        default_collate stacks per-sample tensors, so the (P, ...) prompt masking travels split over the B
        samples: sample i carries rows i·r … i·r + r − 1, r = ⌈P / B⌉ (split_prompt_rows), and
        `join_prompt_rows` puts the collated (B, r, ...) back together.
        """
        if indices and isinstance(indices[0], tuple):
            self.set_epoch(indices[0][0])
            indices = [index for _, index in indices]
        samples = [self[index] for index in indices]
        if self.prompt_masking is not None:
            _, generator = self._rngs(indices[0], stream=(1,))
            for key, rows in zip(PROMPT_MASK_KEYS, self.prompt_masking(generator)):  # (P, ...) each
                for sample, part in zip(samples, split_prompt_rows(rows, len(samples))):
                    sample[key] = part  # (r, ...)
        return samples


class PretrainDataset(torch.utils.data.Dataset, _SampleRandom):
    """MALS-style pre-training samples (spec §2.4, §4.2): entries from read_mals (dicts with image, caption,
    pid, label; tuples in that order work too). Returns image (3, H, W) uint8, erase (4,), norm (2, 3) (see
    ImageTransform.for_device), input_ids/attention_mask (L,), masked_ids (L,), masked_pos (M,),
    masked_labels (M,), pid (), attr_label (K,); in batches also the prompt masking (_SampleRandom)."""

    def __init__(self, entries, transform, tokenizer, max_tokens=56, max_words=56, mask_prob=0.25, max_masks=10,
                 skipgram_prb=0.2, skipgram_size=3, whole_word=True, seed=0, prompt_masking=None):
        self.entries, self.transform, self.tokenizer, self.seed = entries, transform, tokenizer, seed
        self.prompt_masking = prompt_masking
        self.max_tokens, self.max_words = max_tokens, max_words
        self.masking = dict(mask_prob=mask_prob, max_masks=max_masks, skipgram_prb=skipgram_prb,
                            skipgram_size=skipgram_size, whole_word=whole_word)

    def __len__(self):
        return len(self.entries)

    def _text(self, caption, generator):
        input_ids, attention_mask = self.tokenizer([caption], self.max_tokens, "max_length")  # (1, L)
        masked_ids, masked_pos, masked_labels = mask_tokens(input_ids, self.tokenizer, generator, **self.masking)
        return {"input_ids": input_ids[0], "attention_mask": attention_mask[0], "masked_ids": masked_ids[0],
                "masked_pos": masked_pos[0], "masked_labels": masked_labels[0]}

    def __getitem__(self, index):
        rng, generator = self._rngs(index)
        image_path, caption, pid, label = _fields(self.entries[index], ("image", "caption", "pid", "label"))
        sample = self.transform.for_device(load_image(image_path), rng)
        sample.update(self._text(pre_caption(caption, self.max_words), generator))
        sample["pid"] = torch.tensor(pid, dtype=torch.long)
        sample["attr_label"] = torch.tensor(label, dtype=torch.long)
        return sample


class FinetuneDataset(PretrainDataset):
    """Retrieval fine-tuning samples (spec §2.9 E10–E12, §4.7): entries from read_retrieval(train),
    (image_path, caption, pid). Adds eda_input_ids/eda_attention_mask, the EDA copy of the raw caption
    (applied with probability eda_p = 1; cleaned first when clean_eda, i.e. for ICFG/RSTP). The main caption
    is never cleaned (official quirk, spec §4.7)."""

    def __init__(self, entries, transform, tokenizer, max_tokens=56, max_words=56, eda=True, eda_p=1.0,
                 clean_eda=False, seed=0, **masking):
        super().__init__(entries, transform, tokenizer, max_tokens, max_words, seed=seed, **masking)
        self.eda, self.eda_p, self.clean_eda = eda, eda_p, clean_eda

    def __getitem__(self, index):
        rng, generator = self._rngs(index)
        image_path, caption, pid = _fields(self.entries[index], ("image", "caption", "pid"))
        sample = self.transform.for_device(load_image(image_path), rng)
        sample.update(self._text(pre_caption(caption, self.max_words), generator))
        if self.eda:
            use_eda = rng.random() < self.eda_p
            try:
                eda_caption = pre_caption(caption, self.max_words, clean=self.clean_eda,
                                          eda_rng=rng if use_eda else None)
            except ValueError:  # EDA deleted every letter (e.g. a caption of digits): keep the caption
                eda_caption = pre_caption(caption, self.max_words)
            eda_ids, eda_mask = self.tokenizer([eda_caption], self.max_tokens, "max_length")  # (1, L)
            sample["eda_input_ids"], sample["eda_attention_mask"] = eda_ids[0], eda_mask[0]
        sample["pid"] = torch.tensor(pid, dtype=torch.long)
        return sample


class ImageDataset(torch.utils.data.Dataset):
    """Evaluation images: paths → dict(image (3, H, W), index)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return {"image": self.transform(load_image(self.paths[index])), "index": index}


class AttributeDataset(torch.utils.data.Dataset, _SampleRandom):
    """Attribute-recognition samples: entries from read_attributes → dict(image, erase, norm, attr_label (K,));
    in batches also the prompt masking (_SampleRandom)."""

    def __init__(self, entries, transform, seed=0, prompt_masking=None):
        self.entries, self.transform, self.seed, self.prompt_masking = entries, transform, seed, prompt_masking

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        rng, _ = self._rngs(index)
        image_path, label = _fields(self.entries[index], ("image", "label"))
        return {**self.transform.for_device(load_image(image_path), rng),
                "attr_label": torch.tensor(label, dtype=torch.long)}
