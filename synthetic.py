"""The built-in synthetic pedestrian world ("synthetic MALS", DESIGN.md §5): a procedural renderer, a caption
grammar, and the caption → label rules, written to disk in the official file formats so that the readers of
data.py serve it exactly as they serve MALS, CUHK-PEDES and PA-100K.

    python synthetic.py                       # build (or find) data/synthetic and print its paths and sizes
    python synthetic.py --root data/synthetic --sheet /tmp/sheet.png   # also write a contact sheet of images

An identity has fixed MALS attributes (spec §3.1 polarity: 0 = woman / younger than 18 / short hair / has a
hat, backpack, handbag, bag / long sleeves / long lower / dress-or-skirt / wears that colour) plus fixed
details (skin, hair, shoe colour, build). Each image redraws pose, scale, position, background, lighting and
noise. Captions mention a random subset of facts; the 27-dim label is derived from the caption's WORDS by
keyword rules (`label_caption`), −1 where the caption is silent, as MALS was labelled (APTM#31). Generation is
deterministic from a seed (any number of processes) and cached under data/.

Public: make_synthetic, synthetic_world, label_caption, identity_label, sample_identity, make_caption,
render_person, contact_sheet, SYNTHETIC_DEFAULTS, WORLD_VERSION.
"""
import argparse
import json
import math
import os
import re
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import MALS_NUM_ATTRIBUTES, fail, load_image, read_retrieval

UPPER_COLOURS = ("black", "white", "red", "purple", "yellow", "blue", "green", "gray")  # attributes 10–17
LOWER_COLOURS = ("black", "white", "purple", "yellow", "blue", "green", "pink", "gray", "brown")  # 18–26
PALETTE = {"black": (28, 28, 32), "white": (232, 232, 226), "red": (196, 32, 36), "purple": (118, 52, 150),
           "yellow": (228, 198, 40), "blue": (38, 72, 178), "green": (42, 138, 60), "gray": (126, 126, 128),
           "pink": (236, 142, 172), "brown": (118, 76, 42), "orange": (230, 120, 30)}
UPPER_COLOUR_P = (0.22, 0.16, 0.12, 0.06, 0.07, 0.16, 0.08, 0.13)  # our choice: dark and blue tops are common
LOWER_COLOUR_P = (0.28, 0.08, 0.04, 0.03, 0.25, 0.05, 0.05, 0.12, 0.10)
SKIN_TONES = ((241, 206, 178), (224, 178, 140), (190, 140, 100), (141, 96, 66), (96, 64, 44))
HAIR_COLOURS = {"black": (20, 18, 18), "brown": (92, 58, 32), "blonde": (214, 180, 110), "gray": (160, 160, 160)}
SHOE_COLOURS = ("black", "white", "brown", "gray", "red", "blue")
BUILDS = {"slim": 0.86, "average": 1.0, "heavy": 1.18}

_COLOUR_WORDS = {c: c for c in set(UPPER_COLOURS) | set(LOWER_COLOURS)} | {"grey": "gray", "navy": "blue"}
_UPPER_NOUNS = "shirt|tee|top|blouse|jacket|coat|sweater|hoodie|cardigan"
_LOWER_NOUNS = "pants|trousers|jeans|slacks|shorts|skirt|dress"
_MODIFIER = "(?:long sleeved |short sleeved |long sleeve |short sleeve |long |short |mini |maxi |t |loose |tight )"
_COLOUR_RE = "(" + "|".join(sorted(_COLOUR_WORDS)) + ")"
_UPPER_COLOUR_RES = [re.compile(rf" {_COLOUR_RE} {_MODIFIER}{{0,2}}(?:{_UPPER_NOUNS}) "),
                     re.compile(rf" (?:{_UPPER_NOUNS}) (?:is|was) {_COLOUR_RE} ")]
_LOWER_COLOUR_RES = [re.compile(rf" {_COLOUR_RE} {_MODIFIER}{{0,2}}(?:{_LOWER_NOUNS}) "),
                     re.compile(rf" (?:{_LOWER_NOUNS}) (?:is|are|was|were) {_COLOUR_RE} ")]


def _keyword(text, pattern):
    return re.search(pattern, text) is not None


def label_caption(caption):
    """MALS 27-dim label from a caption's words by keyword rules (spec §3.1 polarity; −1 where silent).

    Explicit matching (man/woman, he/she, hat, backpack, …) and implicit extension (girl → woman and younger
    than 18, jeans → long blue pants, t-shirt → short sleeves). Naming the upper colour c gives 0 for "upper c"
    and 1 for the other upper colours; the same for the lower colour. With these rules the README's example
    "a young boy … wearing jeans and a baseball cap" gives [1, 0, …, 1, 1] as published."""
    text = " " + " ".join(re.sub(r"[^a-z]+", " ", caption.lower()).split()) + " "
    label = [-1] * MALS_NUM_ATTRIBUTES

    def decide(k, yes, no):  # attribute k is 1 if only the "yes" words occur, 0 if only the "no" words, else unknown
        if yes != no:
            label[k] = int(yes)

    male = _keyword(text, r" (man|men|guy|gentleman|male|boy|he|his|him|himself) ")
    female = _keyword(text, r" (woman|women|lady|female|girl|she|her|hers|herself) ")
    decide(0, male, female)
    young = _keyword(text, r" (boy|girl|child|kid|teenager|youngster) ")
    adult = _keyword(text, r" (adult|elderly|middle aged) ")
    decide(1, adult, young)
    long_hair = _keyword(text, r" long (\w+ )?hair | hair is long ")
    short_hair = _keyword(text, r" short (\w+ )?hair | hair is short ")
    decide(2, long_hair, short_hair)
    if _keyword(text, r" (no|without a|without any|not wearing a|not wearing any) (\w+ )?(hat|cap|beanie) "):
        label[3] = 1
    elif _keyword(text, r" (hat|cap|beanie) "):
        label[3] = 0
    if _keyword(text, r" (not carrying any bags?|not carrying anything|carries nothing|carrying nothing) "):
        label[4] = label[5] = label[6] = 1
    else:
        if _keyword(text, r" (backpack|rucksack|knapsack) "):
            label[4] = 0
        if _keyword(text, r" (handbag|purse) "):
            label[5] = 0
        if _keyword(text, r" (bag|satchel) "):
            label[6] = 0
    short_sleeve = _keyword(text, r" (short sleeved|short sleeves?|t shirt|tee|sleeveless) ")
    long_sleeve = _keyword(text, r" (long sleeved|long sleeves?|jacket|coat|sweater|hoodie|cardigan) ")
    decide(7, short_sleeve, long_sleeve)
    shorts = _keyword(text, r" shorts ")
    pants = _keyword(text, r" (pants|trousers|jeans|slacks) ")
    short_skirt = _keyword(text, r" (short|mini) (skirt|dress) ")
    long_skirt = _keyword(text, r" (long|maxi) (skirt|dress) ")
    skirt = _keyword(text, r" (skirt|dress) ")
    decide(8, shorts or short_skirt, pants or long_skirt)
    decide(9, shorts or pants, skirt)
    for first, colours, patterns in ((10, UPPER_COLOURS, _UPPER_COLOUR_RES), (18, LOWER_COLOURS, _LOWER_COLOUR_RES)):
        named = {_COLOUR_WORDS[m] for p in patterns for m in p.findall(text)} & set(colours)
        if not named and first == 18 and " jeans " in text:  # implicit extension: jeans are blue (README example)
            named = {"blue"}
        if named:
            for k, colour in enumerate(colours):
                label[first + k] = 0 if colour in named else 1
    return label


def identity_label(identity):
    """The full 27-dim ground truth of an identity (spec §3.1 polarity)."""
    label = [identity[k] for k in ("gender", "age", "hair", "hat", "backpack", "handbag", "bag",
                                   "sleeve", "lower_length", "lower_type")]
    label += [0 if c == identity["upper"] else 1 for c in UPPER_COLOURS]
    label += [0 if c == identity["lower"] else 1 for c in LOWER_COLOURS]
    return label


def _jitter(rgb, rng, amount):
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def sample_identity(rng):
    """Draw one identity: MALS attributes (0/1 as spec §3.1) and fixed visual details."""
    man = rng.random() < 0.5
    child = rng.random() < 0.15
    skirt = (not man) and rng.random() < 0.4
    upper = UPPER_COLOURS[rng.choice(len(UPPER_COLOURS), p=UPPER_COLOUR_P)]
    lower = LOWER_COLOURS[rng.choice(len(LOWER_COLOURS), p=LOWER_COLOUR_P)]
    identity = {
        "gender": int(man), "age": int(not child),
        "hair": int(rng.random() < (0.12 if man else 0.7)),  # 1 = long hair
        "hat": int(rng.random() >= 0.25), "backpack": int(rng.random() >= 0.3),  # 0 = has it
        "handbag": int(rng.random() >= (0.08 if (man or child) else 0.3)), "bag": int(rng.random() >= 0.22),
        "sleeve": int(rng.random() < 0.5),  # 1 = short sleeves
        "lower_length": int(rng.random() < (0.6 if skirt else 0.25)),  # 1 = short
        "lower_type": int(not skirt),  # 0 = dress or skirt
        "upper": upper, "lower": lower,
        "upper_rgb": _jitter(PALETTE[upper], rng, 14), "lower_rgb": _jitter(PALETTE[lower], rng, 14),
        "skin": _jitter(SKIN_TONES[rng.integers(len(SKIN_TONES))], rng, 8),
        "hair_colour": str(rng.choice(list(HAIR_COLOURS), p=(0.45, 0.3, 0.17, 0.08) if not child else
                                      (0.5, 0.3, 0.2, 0.0))),
        "shoe_colour": str(rng.choice(SHOE_COLOURS)),
        "build": str(rng.choice(list(BUILDS), p=(0.3, 0.5, 0.2))),
        "height": float(rng.uniform(0.93, 1.04)),
    }
    for item in ("hat", "backpack", "handbag", "bag"):
        identity[f"{item}_colour"] = str(rng.choice(["black", "white", "red", "blue", "brown", "gray", "green",
                                                     "pink" if not man else "orange"]))
    return identity


# caption grammar -------------------------------------------------------------------------------------------

def _pick(rng, options):
    return options[rng.integers(len(options))]


def _article(np_):
    return ("an " if np_[0] in "aeiou" else "a ") + np_


def _join(phrases):
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0]


def _garment_np(rng, noun, colour, plural):
    np_ = f"{colour} {noun}" if colour else noun
    if plural:
        return _pick(rng, [np_, np_, "a pair of " + np_])
    return _article(np_)


def make_caption(identity, rng):
    """One caption mentioning a random subset (3–6) of the identity's facts, in varied order and wording."""
    man, child = identity["gender"] == 1, identity["age"] == 0
    gendered = rng.random() < 0.85
    if child:
        subject = _pick(rng, ["a boy", "a little boy", "a young boy"] if man else
                        ["a girl", "a little girl", "a young girl"]) if gendered else _pick(rng, ["a child", "a kid"])
    elif gendered:
        subject = _pick(rng, ["a man", "a man", "a guy", "a gentleman", "a male", "an adult man",
                              "a middle-aged man"] if man else
                        ["a woman", "a woman", "a lady", "a female", "an adult woman", "a middle-aged woman"])
    else:
        subject = _pick(rng, ["a person", "a pedestrian", "someone", "an adult"] if not child else ["a child"])
    pron, poss = (("he", "his") if man else ("she", "her")) if gendered else ("the person", "their")

    facts = {}
    upper_noun = None
    if rng.random() < 0.65:
        upper_noun = _pick(rng, ["t-shirt", "short-sleeved shirt", "short sleeve top", "tee"]
                           if identity["sleeve"] == 1 else
                           ["long-sleeved shirt", "jacket", "sweater", "coat", "hoodie", "long sleeve top"])
    else:
        upper_noun = _pick(rng, ["shirt", "top"] + (["blouse"] if not man else []))
    upper_colour = identity["upper"] if rng.random() < 0.85 else None
    if upper_colour and rng.random() < 0.15:
        facts["upper"] = ("sentence", f"{poss} {upper_noun} is {upper_colour}")
    else:
        np_ = _garment_np(rng, upper_noun, upper_colour, False)
        facts["upper"] = (_pick(rng, [f"is wearing {np_}", f"wears {np_}", f"has on {np_}",
                                      f"is dressed in {np_}"]), _pick(rng, [f"in {np_}", f"wearing {np_}"]))

    if identity["lower_type"] == 1:
        long_nouns = ["pants", "trousers", "long pants"] + (["jeans"] * 2 if identity["lower"] == "blue" else [])
        lower_noun = "shorts" if identity["lower_length"] == 1 else _pick(rng, long_nouns)
    else:
        lower_noun = _pick(rng, ["short skirt", "mini skirt", "skirt"] if identity["lower_length"] == 1 else
                           ["long skirt", "long dress", "skirt"])
    plural = lower_noun.endswith("s")
    lower_colour = identity["lower"] if rng.random() < 0.85 else None
    if lower_colour and rng.random() < 0.15:
        facts["lower"] = ("sentence", f"{poss} {lower_noun} {'are' if plural else 'is'} {lower_colour}")
    else:
        np_ = _garment_np(rng, lower_noun, lower_colour, plural)
        facts["lower"] = (_pick(rng, [f"is wearing {np_}", f"wears {np_}", f"has on {np_}"]),
                          _pick(rng, [f"in {np_}", f"wearing {np_}", f"and {np_}"]))

    length = "long" if identity["hair"] == 1 else "short"
    hair_np = f"{length} {identity['hair_colour']} hair" if rng.random() < 0.5 else f"{length} hair"
    facts["hair"] = (_pick(rng, [f"has {hair_np}", f"has {hair_np}", "sentence"]), f"with {hair_np}")
    if facts["hair"][0] == "sentence":
        facts["hair"] = ("sentence", f"{poss} hair is {length}")

    if identity["hat"] == 0:
        hat_np = _article(f"{identity['hat_colour']} {_pick(rng, ['hat', 'cap', 'baseball cap', 'beanie'])}")
        facts["hat"] = (_pick(rng, [f"is wearing {hat_np}", f"wears {hat_np} on {poss} head"]),
                        _pick(rng, [f"wearing {hat_np}", f"with {hat_np}"]))
    else:
        facts["hat"] = (_pick(rng, ["is not wearing a hat", "has no hat"]), "without a hat")

    carried = [item for item in ("backpack", "handbag", "bag") if identity[item] == 0]
    if carried:
        said = [item for item in carried if rng.random() < 0.75] or [_pick(rng, carried)]
        vps, pps = [], []
        for item in said:
            c = identity[f"{item}_colour"] if rng.random() < 0.5 else ""
            c = c + " " if c else ""
            if item == "backpack":
                vps.append(_pick(rng, [f"is carrying a {c}backpack", f"carries a {c}backpack on {poss} back"]))
                pps.append(f"with a {c}backpack")
            elif item == "handbag":
                np_ = _pick(rng, [f"a {c}handbag", f"a {c}purse"])
                vps.append(_pick(rng, [f"is holding {np_} in {poss} hand", f"carries {np_}"]))
                pps.append(f"holding {np_}")
            else:
                np_ = _pick(rng, [f"a {c}shoulder bag", f"a {c}bag over {poss} shoulder", f"a {c}satchel"])
                vps.append(f"carries {np_}")
                pps.append(f"with {np_}")
        facts["carried"] = (" and ".join(vps), " and ".join(pps))
    else:
        facts["carried"] = (_pick(rng, ["is not carrying any bags", "carries nothing"]), "carrying nothing")

    shoe_np = f"{identity['shoe_colour']} {_pick(rng, ['shoes', 'sneakers', 'boots'])}"
    facts["shoes"] = (_pick(rng, [f"wears {shoe_np}", f"has {shoe_np} on"]), f"in {shoe_np}")
    build_word = {"slim": ["slim", "thin"], "average": ["of average build"], "heavy": ["heavy-set", "chubby"]}
    facts["build"] = (f"is {_pick(rng, build_word[identity['build']])}", None)

    weights = {"upper": 0.9, "lower": 0.85, "hair": 0.45, "hat": 0.4, "carried": 0.6, "shoes": 0.3, "build": 0.2}
    while True:
        chosen = [k for k, w in weights.items() if rng.random() < w]
        if 3 <= len(chosen) <= 6:
            break
    rng.shuffle(chosen)

    lead_pp = ""
    if facts[chosen[0]][0] != "sentence" and facts[chosen[0]][1] and not facts[chosen[0]][1].startswith("and ") \
            and rng.random() < 0.5:
        lead_pp = " " + facts[chosen[0]][1]
        chosen = chosen[1:]
    sentences = [facts[key][1] for key in chosen if facts[key][0] == "sentence"]
    vps = [facts[key][0] for key in chosen if facts[key][0] != "sentence"]
    first = vps[:rng.integers(1, 4)]
    rest = vps[len(first):]
    body = subject + lead_pp + " " + (_join(first) if first else "is walking")
    out = [body]
    if rest:
        out.append(pron + " " + _join(rest))
    out += sentences
    return " ".join(s[0].upper() + s[1:] + "." for s in out)


# renderer ----------------------------------------------------------------------------------------------------

def _limb(draw, start, end, width, fill):
    """A thick segment with round ends."""
    draw.line([start, end], fill=fill, width=max(1, int(round(width))))
    r = width / 2
    for x, y in (start, end):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _lerp(a, b, t):
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def render_person(identity, rng, size=(192, 64)):
    """Draw one image of `identity` (H×W = size, 3:1): pose, scale, position, background, light and noise vary."""
    height, width = size
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    # background: wall, ground and clutter (windows, signs, poles) in muted random colours
    horizon = int(height * rng.uniform(0.45, 0.8))
    wall = tuple(int(v) for v in rng.integers(70, 200, 3))
    ground = tuple(int(v) for v in rng.integers(60, 170, 3))
    draw.rectangle([0, 0, width, horizon], fill=wall)
    draw.rectangle([0, horizon, width, height], fill=ground)
    for _ in range(rng.integers(2, 8)):
        colour = tuple(int(0.5 * c + 0.5 * g) for c, g in zip(rng.integers(0, 256, 3), wall))
        x0, y0 = rng.uniform(-10, width), rng.uniform(-10, horizon)
        draw.rectangle([x0, y0, x0 + rng.uniform(4, 30), y0 + rng.uniform(4, 50)], fill=colour)
    if rng.random() < 0.5:
        x = rng.uniform(0, width)
        draw.line([(x, 0), (x, horizon + 10)], fill=tuple(int(v) for v in rng.integers(30, 120, 3)),
                  width=int(rng.integers(1, 4)))

    man, child = identity["gender"] == 1, identity["age"] == 0
    build = BUILDS[identity["build"]]
    scale = rng.uniform(0.55, 0.66) if child else rng.uniform(0.8, 0.93) * identity["height"]
    person_h = height * min(scale, 0.96)
    u = person_h / 100  # body unit
    feet_y = height - rng.uniform(0.01, 0.05) * height
    top = feet_y - person_h
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    side = 1 if rng.random() < 0.5 else -1  # which side carries the bags (mirrors with pose)
    back_view = rng.random() < 0.3
    head_r = (8.2 if child else 6.4) * u
    head_c = (cx, top + head_r)
    neck_y = top + 2 * head_r
    shoulder_y = neck_y + 1.5 * u
    waist_y = top + (45 if child else 47) * u
    shoulder_hw = (11.5 if man else 9.0) * u * build * (0.85 if child else 1.0)
    hip_hw = (8.5 if man else 10.0) * u * build * (0.85 if child else 1.0)
    skin, upper, lower = identity["skin"], identity["upper_rgb"], identity["lower_rgb"]
    hair_rgb = HAIR_COLOURS[identity["hair_colour"]]
    shoe_rgb = PALETTE.get(identity["shoe_colour"], (40, 40, 40))

    # long hair falls behind the shoulders
    if identity["hair"] == 1:
        draw.rectangle([cx - head_r * 1.05, head_c[1], cx + head_r * 1.05, shoulder_y + 13 * u], fill=hair_rgb)
    # backpack body behind the torso, sticking out on one side (front view)
    if identity["backpack"] == 0 and not back_view:
        bx = cx + side * shoulder_hw * 0.7
        draw.rounded_rectangle([min(bx, bx + side * 7 * u), shoulder_y + 2 * u, max(bx, bx + side * 7 * u),
                                waist_y - 4 * u], radius=2 * u, fill=PALETTE[identity["backpack_colour"]])

    # legs: pants (long or shorts) or bare legs under a skirt
    stride = rng.uniform(0, 7) * u
    leg_w = (6.5 if man else 5.8) * u * build
    feet = [(cx - 3 * u - stride / 2, feet_y - 2 * u), (cx + 3 * u + stride / 2, feet_y - 2 * u)]
    hips = [(cx - hip_hw * 0.45, waist_y + 2 * u), (cx + hip_hw * 0.45, waist_y + 2 * u)]
    for hip, foot in zip(hips, feet):
        if identity["lower_type"] == 1:
            cut = 1.0 if identity["lower_length"] == 0 else 0.42
            _limb(draw, hip, foot, leg_w * 0.85, skin)
            _limb(draw, hip, _lerp(hip, foot, cut), leg_w, lower)
        else:
            _limb(draw, hip, foot, leg_w * 0.8, skin)
    if identity["lower_type"] == 0:  # skirt or dress: a flaring trapezoid
        hem = waist_y + (feet_y - waist_y) * (0.85 if identity["lower_length"] == 0 else 0.38)
        flare = hip_hw * (1.45 if identity["lower_length"] == 0 else 1.3)
        draw.polygon([(cx - hip_hw * 0.9, waist_y - 2 * u), (cx + hip_hw * 0.9, waist_y - 2 * u),
                      (cx + flare, hem), (cx - flare, hem)], fill=lower)
    for foot in feet:
        draw.ellipse([foot[0] - 3.5 * u, foot[1] - 1.5 * u, foot[0] + 3.5 * u, foot[1] + 2 * u], fill=shoe_rgb)

    # torso
    draw.polygon([(cx - shoulder_hw, shoulder_y), (cx + shoulder_hw, shoulder_y),
                  (cx + hip_hw * 0.95, waist_y + 3 * u), (cx - hip_hw * 0.95, waist_y + 3 * u)], fill=upper)
    draw.ellipse([cx - shoulder_hw - 2 * u, shoulder_y - 1 * u, cx - shoulder_hw + 4 * u, shoulder_y + 5 * u],
                 fill=upper)
    draw.ellipse([cx + shoulder_hw - 4 * u, shoulder_y - 1 * u, cx + shoulder_hw + 2 * u, shoulder_y + 5 * u],
                 fill=upper)
    if identity["backpack"] == 0:
        colour = PALETTE[identity["backpack_colour"]]
        if back_view:  # the backpack covers the back
            draw.rounded_rectangle([cx - shoulder_hw * 0.75, shoulder_y + 2 * u, cx + shoulder_hw * 0.75,
                                    waist_y - 3 * u], radius=2 * u, fill=colour)
        else:  # two straps over the shoulders
            for s in (-1, 1):
                draw.line([(cx + s * shoulder_hw * 0.55, shoulder_y), (cx + s * shoulder_hw * 0.5, waist_y - 8 * u)],
                          fill=colour, width=max(1, int(1.8 * u)))
    if identity["bag"] == 0:  # diagonal strap, bag at the opposite hip
        colour = PALETTE[identity["bag_colour"]]
        draw.line([(cx - side * shoulder_hw * 0.6, shoulder_y), (cx + side * hip_hw * 1.05, waist_y)],
                  fill=colour, width=max(1, int(1.4 * u)))
        bx = cx + side * hip_hw * 1.05
        draw.rectangle([bx - 4.5 * u, waist_y - 1 * u, bx + 4.5 * u, waist_y + 7 * u], fill=colour)

    # arms: sleeves in the upper colour, long to the wrist or short to above the elbow
    arm_len, arm_w = (34 if child else 37) * u, 4.6 * u * build
    hands = []
    for s in (-1, 1):
        angle = math.radians(rng.uniform(4, 22))
        shoulder = (cx + s * (shoulder_hw - 1.5 * u), shoulder_y + 2 * u)
        hand = (shoulder[0] + s * math.sin(angle) * arm_len, shoulder[1] + math.cos(angle) * arm_len)
        _limb(draw, shoulder, hand, arm_w * 0.85, skin)
        _limb(draw, shoulder, _lerp(shoulder, hand, 0.93 if identity["sleeve"] == 0 else 0.35), arm_w, upper)
        hands.append(hand)
    if identity["handbag"] == 0:  # a handbag hangs from the hand on the carrying side
        hx, hy = hands[1] if side == 1 else hands[0]
        colour = PALETTE[identity["handbag_colour"]]
        draw.line([(hx, hy), (hx - 2.5 * u, hy + 3 * u)], fill=colour, width=max(1, int(u)))
        draw.line([(hx, hy), (hx + 2.5 * u, hy + 3 * u)], fill=colour, width=max(1, int(u)))
        draw.rounded_rectangle([hx - 5 * u, hy + 3 * u, hx + 5 * u, hy + 11 * u], radius=u, fill=colour)

    # head, hair, hat
    draw.ellipse([head_c[0] - head_r, head_c[1] - head_r, head_c[0] + head_r, head_c[1] + head_r],
                 fill=hair_rgb if back_view else skin)
    if not back_view:
        draw.chord([head_c[0] - head_r * 1.08, head_c[1] - head_r * 1.12, head_c[0] + head_r * 1.08,
                    head_c[1] + head_r * (0.5 if identity["hair"] == 1 else 0.2)], 180, 360, fill=hair_rgb)
        if identity["hair"] == 1:  # locks along the face
            for s in (-1, 1):
                x0, x1 = sorted((head_c[0] + s * head_r * 0.7, head_c[0] + s * head_r * 1.1))
                draw.rectangle([x0, head_c[1] - head_r * 0.3, x1, head_c[1] + head_r * 1.4], fill=hair_rgb)
    if identity["hat"] == 0:
        colour = PALETTE[identity["hat_colour"]]
        draw.chord([head_c[0] - head_r * 1.1, head_c[1] - head_r * 1.35, head_c[0] + head_r * 1.1,
                    head_c[1] + head_r * 0.3], 180, 360, fill=colour)
        draw.rectangle([head_c[0] - head_r * 1.45, head_c[1] - head_r * 0.55, head_c[0] + head_r * 1.45,
                        head_c[1] - head_r * 0.3], fill=colour)

    # lighting (global gain and tint), sensor noise
    array = np.asarray(image, dtype=np.float32)
    gain = rng.uniform(0.72, 1.22) * (1 + rng.uniform(-0.07, 0.07, 3))
    gradient = np.linspace(rng.uniform(0.85, 1.1), rng.uniform(0.85, 1.1), height, dtype=np.float32)[:, None, None]
    array = array * gain * gradient + rng.normal(0, rng.uniform(2, 9), array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


# building the world on disk ---------------------------------------------------------------------------------

# 6,000 MALS-style identities (24,000 images): with the 6,000 images of 1,500 before, the tiny model over-fitted
# its pre-training set (README, the tiny preset). The retrieval and attribute splits do not depend on it.
SYNTHETIC_DEFAULTS = dict(mals_ids=6000, mals_images_per_id=4, train_ids=300, val_ids=50, test_ids=100,
                          images_per_id=4, attr_train=1000, attr_test=500, image_size=(192, 64))
_MARKER = "COMPLETE.json"
WORLD_VERSION = 1  # bump when the renderer or the caption grammar changes: cached worlds are then rebuilt


def _synthetic_paths(root):
    return {"root": root, "mals_ann": [os.path.join(root, "mals", f"synth_{i}_attrs.json") for i in range(2)],
            "mals_root": os.path.join(root, "mals"), "cuhk_raw": os.path.join(root, "cuhk", "reid_raw.json"),
            "cuhk_root": os.path.join(root, "cuhk", "imgs"),
            "attr_train": os.path.join(root, "attributes", "attr_train.json"),
            "attr_test": os.path.join(root, "attributes", "attr_test.json"),
            "attr_root": os.path.join(root, "attributes"), "info": os.path.join(root, _MARKER)}


def synthetic_world(root):
    """The world under `root` as it is (any settings), generated with the defaults if it is not there."""
    paths = _synthetic_paths(root)
    return paths if os.path.isfile(paths["info"]) else make_synthetic(root, verbose=True)


def _save(image, path):
    image.save(path, quality=92)


def _processed_tokens(caption):
    return re.findall(r"[a-z0-9]+|[^a-z0-9\s]", caption.lower())


def _render_job(job):
    """Render and save one image; return its captions. Each image has its own seed, so the result does not
    depend on the number of processes."""
    identity, seed_keys, path, n_captions, size = job
    rng = np.random.default_rng(seed_keys)
    _save(render_person(identity, rng, size), path)
    return [make_caption(identity, rng) for _ in range(n_captions)]


def make_synthetic(root="data/synthetic", seed=0, verbose=False, workers=None, **sizes):
    """Generate (once) the synthetic pedestrian world under `root` in the official formats; return its paths.

    Writes MALS `mals/synth_{0,1}_attrs.json` + `mals/gene_crop/` (pre-training; own identities, one caption
    per image, image_id unique per image as in MALS), CUHK-PEDES `cuhk/reid_raw.json` + `cuhk/imgs/`
    (retrieval identities, disjoint train/val/test, `images_per_id` images and 2 captions each) and
    `attributes/attr_{train,test}.json` (PA-100K style, the FULL 27-dim ground truth, 2 images per identity).
    Sizes default to SYNTHETIC_DEFAULTS. Idempotent: a complete marker with the same settings means the world
    is already there; generation writes to a temporary folder renamed at the end, so an interrupted run
    leaves nothing half-made. `workers` processes render the images (default: all CPUs, at most 8)."""
    unknown = set(sizes) - set(SYNTHETIC_DEFAULTS)
    if unknown:
        fail(f"make_synthetic: unknown size argument(s) {sorted(unknown)}; known: {sorted(SYNTHETIC_DEFAULTS)}")
    settings = {**SYNTHETIC_DEFAULTS, **sizes, "seed": seed, "version": WORLD_VERSION}
    settings["image_size"] = list(settings["image_size"])
    paths = _synthetic_paths(root)
    if os.path.isfile(paths["info"]):
        with open(paths["info"]) as f:
            if json.load(f).get("settings") == settings:
                return paths
    elif os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        # only a world (or an empty folder) is ever replaced below: anything else there is the user's
        fail(f"{root} exists and is not a synthetic world (it has no {_MARKER}); pass another folder "
             "(--data-dir, --root) or move it away")
    start = time.time()
    tmp = f"{root.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    size = tuple(settings["image_size"])
    for folder in ("mals/gene_crop", "cuhk/imgs/synth", "attributes/imgs/train", "attributes/imgs/test"):
        os.makedirs(os.path.join(tmp, folder))
    jobs, records = [], []  # records[i] describes the annotation entry of jobs[i]

    # (a) MALS-style pre-training set
    rng = np.random.default_rng([seed, 0])
    for i in range(settings["mals_ids"]):
        identity = sample_identity(rng)
        for k in range(settings["mals_images_per_id"]):
            n = len(records)
            rel = f"gene_crop/{n:06d}.jpg"
            jobs.append((identity, [seed, 0, i, k], os.path.join(tmp, "mals", rel), 1, size))
            records.append(("mals", rel, f"synth_{n}", None))
    # (b) CUHK-PEDES-style retrieval set: ids 1..N, disjoint across splits
    rng = np.random.default_rng([seed, 1])
    pid = 0
    for split in ("train", "val", "test"):
        for _ in range(settings[f"{split}_ids"]):
            pid += 1
            identity = sample_identity(rng)
            for k in range(settings["images_per_id"]):
                rel = f"synth/{pid:05d}_{k}.jpg"
                jobs.append((identity, [seed, 1, pid, k], os.path.join(tmp, "cuhk", "imgs", rel), 2, size))
                records.append(("cuhk", rel, pid, split))
    # (c) attribute recognition set with the full ground truth (new identities, 2 images each)
    rng = np.random.default_rng([seed, 2])
    for split_index, split in enumerate(("train", "test")):
        for n in range(settings[f"attr_{split}"]):
            if n % 2 == 0:
                identity = sample_identity(rng)
            rel = f"imgs/{split}/{n:05d}.jpg"
            jobs.append((identity, [seed, 2, split_index, n], os.path.join(tmp, "attributes", rel), 0, size))
            records.append(("attr", rel, identity_label(identity), split))

    workers = workers or min(8, os.cpu_count() or 1)
    progress = dict(total=len(jobs), desc=f"making the synthetic world under {root}", unit="image",
                    disable=not verbose, leave=False, dynamic_ncols=True)
    try:
        if workers > 1:
            import multiprocessing
            with multiprocessing.Pool(workers) as pool:
                captions = list(tqdm(pool.imap(_render_job, jobs, chunksize=64), **progress))
        else:
            captions = list(tqdm(map(_render_job, jobs), **progress))
    except BaseException:  # Ctrl-C while rendering (most of the time here): leave no half-made folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    mals, raw, attrs = [], [], {"train": [], "test": []}
    for (kind, rel, key, split), texts in zip(records, captions):
        if kind == "mals":
            mals.append({"image": rel, "caption": texts[0], "image_id": key, "label": label_caption(texts[0])})
        elif kind == "cuhk":
            raw.append({"split": split, "captions": texts, "file_path": rel,
                        "processed_tokens": [_processed_tokens(c) for c in texts], "id": key})
        else:
            attrs[split].append({"image": rel, "label": key})
    half = (len(mals) + 1) // 2
    for j, part in enumerate((mals[:half], mals[half:])):
        with open(os.path.join(tmp, "mals", f"synth_{j}_attrs.json"), "w") as f:
            json.dump(part, f)
    with open(os.path.join(tmp, "cuhk", "reid_raw.json"), "w") as f:
        json.dump(raw, f)
    for split, entries in attrs.items():
        with open(os.path.join(tmp, "attributes", f"attr_{split}.json"), "w") as f:
            json.dump(entries, f)

    stats = {"mals": {"identities": settings["mals_ids"], "images": len(mals), "captions": len(mals)}}
    for split in ("train", "val", "test"):
        n_images = sum(e["split"] == split for e in raw)
        stats[f"cuhk_{split}"] = {"identities": settings[f"{split}_ids"], "images": n_images,
                                  "captions": 2 * n_images}
    for split, entries in attrs.items():
        stats[f"attr_{split}"] = {"identities": (len(entries) + 1) // 2, "images": len(entries)}
    seconds = round(time.time() - start, 1)
    with open(os.path.join(tmp, _MARKER), "w") as f:
        json.dump({"settings": settings, "stats": stats, "seconds": seconds}, f, indent=1)
    if os.path.exists(root):  # a world with other settings, or an empty folder: replace it
        old = f"{root.rstrip(os.sep)}.old-{os.getpid()}"
        os.rename(root, old)
        shutil.rmtree(old)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.rename(tmp, root)
    if verbose:
        print(f"synthetic world written to {root} in {seconds}s ({workers} processes): {stats}")
    return paths


def contact_sheet(paths, out_path, columns=10, captions=None):
    """Tile images into one PNG (for looking at the synthetic world)."""
    images = [load_image(p) for p in paths]
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        sheet.paste(image.resize((w, h)), ((i % columns) * w, (i // columns) * h))
    sheet.save(out_path)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/synthetic", help="where the synthetic world lives (our choice)")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--sheet", default=None, help="also write a PNG contact sheet of test images here")
    args = parser.parse_args(argv)
    paths = make_synthetic(args.root, args.seed, verbose=True)
    with open(paths["info"]) as f:
        print(json.dumps(json.load(f), indent=1))
    print(json.dumps(paths, indent=1))
    if args.sheet:
        test = read_retrieval("synthetic", paths["cuhk_raw"], "test")
        print("contact sheet:", contact_sheet(test.image_paths[:40], args.sheet))


if __name__ == "__main__":
    main()
