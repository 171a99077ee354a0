"""Tests for data.py (pytest, CPU, offline, tiny sizes): readers for every format, bad-input failures (exit 2 and
a message), MLM masking (spec §2.4), the no-[SEP] tokenizer (§1.3), transforms (§4.6), text preprocessing (§4.7)
and the synthetic world (labels derived from caption words, §3.1 polarity).

    HF_HUB_OFFLINE=1 python -m pytest -q test_data.py
"""
import json
import os
import pickle
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data


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
    a = data.make_synthetic(str(tmp_path / "a"), seed=3, **TINY)
    b = data.make_synthetic(str(tmp_path / "b"), seed=3, workers=1, **TINY)  # same world, any process count
    for key in ("cuhk_raw", "attr_test"):
        assert open(a[key]).read() == open(b[key]).read()
    assert open(a["mals_ann"][1]).read() == open(b["mals_ann"][1]).read()
    with open(os.path.join(a["cuhk_root"], "synth", "00001_0.jpg"), "rb") as f1, \
            open(os.path.join(b["cuhk_root"], "synth", "00001_0.jpg"), "rb") as f2:
        assert f1.read() == f2.read()
    stamp = os.path.getmtime(a["info"])
    assert data.make_synthetic(str(tmp_path / "a"), seed=3, **TINY) == a and os.path.getmtime(a["info"]) == stamp
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    mals = data.read_mals(a["mals_ann"], a["mals_root"])
    assert len(mals) == 12 and len({e["pid"] for e in mals}) == 12  # image_id unique per image, as MALS
    assert all(e["label"] == data.label_caption(e["caption"]) for e in mals)
    train = data.read_retrieval("synthetic", a["cuhk_raw"], "train")
    assert len(train) == 4 * 2 * 2 and {e[2] for e in train} == set(range(4))
    test = data.read_retrieval("synthetic", a["cuhk_raw"], "test")
    assert len(test.image_paths) == 6 and len(test.captions) == 12 and sorted(set(test.g_pids)) == [7, 8, 9]
    assert data.load_retrieval("synthetic", str(tmp_path / "a"), "val").g_pids == [5, 5, 6, 6]
    attrs = data.read_attributes(a["attr_test"], split="test")
    assert len(attrs) == 4 and all(set(label) <= {0, 1} and len(label) == 27 for _, label in attrs)
    image = Image.open(attrs[0][0])
    assert image.size == (16, 48)
    c = data.make_synthetic(str(tmp_path / "a"), seed=4, **TINY)  # other settings: regenerated in place
    assert open(c["cuhk_raw"]).read() != open(b["cuhk_raw"]).read()


def test_synthetic_labels_follow_caption_words():
    rng = np.random.default_rng(0)
    silent = 0
    for _ in range(400):
        identity = data.sample_identity(rng)
        caption = data.make_caption(identity, rng)
        label, truth = data.label_caption(caption), data.identity_label(identity)
        assert all(l == -1 or l == t for l, t in zip(label, truth)), (caption, label, truth)
        words = set(caption.lower().replace(".", " ").replace(",", " ").split())
        if not words & {"hat", "cap", "beanie"}:
            assert label[3] == -1
            silent += 1
        assert sum(v != -1 for v in label) >= 1
    assert silent > 100
    upper = [data.sample_identity(rng)["upper"] for _ in range(100)]
    assert max(upper.count(c) for c in data.UPPER_COLOURS) >= 10  # identities share colours
    # polarity (spec §3.1): README example "a young boy … jeans and a baseball cap" → [1, 0, …, 1, 1]
    label = data.label_caption("a young boy wearing a black hoodie leaning against a wall with his hands on his "
                               "hips and his hands on his hips wearing jeans and a baseball cap")  # MALS README
    assert label[:2] == [1, 0] and label[3] == 0 and label[7:10] == [0, 0, 1] and label[-2:] == [1, 1]
    assert label[10] == 0 and label[11:18] == [1] * 7 and label[22] == 0  # black upper; jeans → blue lower
    label = data.label_caption("A woman in a red t-shirt, without a hat, carries nothing.")
    assert label[0] == 0 and label[3:8] == [1, 1, 1, 1, 1] and label[12] == 0 and label[10] == 1
    assert data.label_caption("Her black hair and black shoes.")[10:] == [-1] * 17


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
