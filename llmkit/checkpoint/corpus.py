"""A built-in English text generator: tokenizer training and offline calibration need text
and the hub is not always there. Seeded, so the same call always gives the same text."""

from __future__ import annotations

import random

_NAMES = [
    "Ada",
    "Ben",
    "Cleo",
    "Dev",
    "Esme",
    "Finn",
    "Gus",
    "Hana",
    "Ivo",
    "June",
    "Kai",
    "Lena",
    "Milo",
    "Nora",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sami",
    "Tess",
]
_ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "bear", "duck", "mouse", "goat"]
_THINGS = [
    "lamp",
    "boat",
    "kite",
    "book",
    "cup",
    "map",
    "key",
    "drum",
    "coat",
    "basket",
    "garden",
    "window",
    "bridge",
    "letter",
    "candle",
    "ladder",
    "engine",
    "violin",
]
_PLACES = [
    "the market",
    "the river",
    "the old mill",
    "the forest",
    "the harbour",
    "the school",
    "the hill",
    "the station",
    "the library",
    "the kitchen",
    "the meadow",
    "the tower",
]
_ADJECTIVES = [
    "small",
    "bright",
    "quiet",
    "heavy",
    "red",
    "curious",
    "broken",
    "warm",
    "tall",
    "strange",
    "gentle",
    "busy",
    "golden",
    "cold",
    "tiny",
    "careful",
    "happy",
]
_VERBS = [
    ("found", "find"),
    ("carried", "carry"),
    ("painted", "paint"),
    ("fixed", "fix"),
    ("watched", "watch"),
    ("opened", "open"),
    ("lost", "lose"),
    ("shared", "share"),
    ("built", "build"),
    ("cleaned", "clean"),
    ("followed", "follow"),
    ("sold", "sell"),
]
_TIMES = [
    "In the morning",
    "After lunch",
    "One rainy day",
    "At night",
    "Later that week",
    "On Sunday",
    "Before sunrise",
    "Every winter",
    "Long ago",
    "The next day",
]
_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tal",
    "vos",
    "dri",
    "ne",
    "sha",
    "bur",
    "gel",
    "fin",
    "or",
    "ul",
    "pa",
    "quo",
    "zet",
    "wen",
    "hi",
    "mar",
    "sto",
    "ya",
    "ix",
    "ce",
]
_FEELINGS = ["glad", "tired", "surprised", "proud", "worried", "calm", "excited", "sleepy"]


def _noun(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)} {rng.choice(_ANIMALS + _THINGS)}"


def _sentence(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    past, base = rng.choice(_VERBS)
    kind = rng.randrange(7)
    if kind == 0:
        return f"{rng.choice(_TIMES)}, {name} {past} a {_noun(rng)} near {rng.choice(_PLACES)}."
    if kind == 1:
        return f'"Can you {base} the {rng.choice(_THINGS)}?" asked {name}. "Yes," said {other}.'
    if kind == 2:
        a, b = rng.randrange(2, 60), rng.randrange(2, 40)
        return f"{name} had {a} {rng.choice(_THINGS)}s and {other} gave {b} more, so {a + b}."
    if kind == 3:
        return f"The {_noun(rng)} was {rng.choice(_FEELINGS)} because {name} {past} it."
    if kind == 4:
        items = ", ".join(rng.sample(_THINGS, 3))
        return f"At {rng.choice(_PLACES)} they saw a {items} and a {rng.choice(_ANIMALS)}."
    if kind == 5:
        return f"{name} and {other} went to {rng.choice(_PLACES)} to {base} a {_noun(rng)}."
    return f"{name} felt {rng.choice(_FEELINGS)}. The {rng.choice(_ANIMALS)} did not."


def paragraphs(num: int, seed: int = 0) -> list[str]:
    """`num` short paragraphs of simple English, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randrange(3, 9))) for _ in range(num)]


def made_up_words(num: int, seed: int = 0) -> list[str]:
    """`num` distinct invented words (names of towns, plants, ...) built from syllables."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < num:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randrange(2, 6)))
        words.setdefault(word.capitalize() if rng.random() < 0.3 else word)
    return list(words)


def text(num_paragraphs: int = 2000, seed: int = 0) -> str:
    return "\n\n".join(paragraphs(num_paragraphs, seed)) + "\n"
