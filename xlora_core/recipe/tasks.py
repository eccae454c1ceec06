"""Synthetic data for the three expert tasks, and the helpers to train and score on it.

Each example is one user message (the prompt) whose answer is the assistant reply:
  - arithmetic: "Compute: 47 + 38" -> "85"
  - sorting:    "Sort alphabetically: pear, apple, fig" -> "apple, fig, pear"
  - json:       "Extract as JSON: name is Alice, age is 31, city is Paris"
                -> '{"name": "Alice", "age": 31, "city": "Paris"}'

Generators are deterministic in (task, n, seed, split). The eval split draws words, names and places from
lists disjoint from the train lists, so a high eval score means the skill was learned, not the vocabulary.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

import torch


def _read_words(name: str) -> list[str]:
    """A word list shipped in recipe/data/: one word a line, '#' lines are comments."""
    text = resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# ~4k lower-case single-token words of SmolLM2's vocabulary, for training only (the file says how they
# were chosen).
EXTRA_TRAIN_WORDS = _read_words("sort_words.txt")

TASKS = ("arithmetic", "sorting", "json")
IGNORE_INDEX = -100  # labels with this value are skipped by the causal-LM loss

# -----------------------------------------------------------------------------
# vocabularies, one list per split (disjoint)

# Sorting words: the train list is large (hand-written + ~4k entries of the SmolLM2 vocabulary), so the
# expert learns to order whatever it is given; with ~90 train words it answered unseen ones with train
# words, and with ~300 it still got the order of unseen words wrong.
WORDS = {
    "train": """
        apple pear fig plum grape lemon mango peach cherry melon olive onion garlic carrot potato tomato
        bread butter cheese honey sugar salt pepper rice bean corn wheat oat barley pasta soup salad cake
        river ocean lake forest desert valley canyon island meadow hill cliff glacier beach coast field
        tiger zebra horse sheep goat rabbit mouse eagle falcon parrot otter beaver badger camel whale shark
        chair table lamp sofa shelf mirror pillow blanket carpet curtain window door floor roof wall stairs
        hammer wrench shovel ladder bucket rope nail screw drill chisel needle thread brush broom basket
        violin guitar piano flute drum trumpet banjo harp organ bell
        apron badge belt boot button cap cloak coat collar dress glove hat jacket jeans mask ring scarf
        shirt shoe skirt sock sweater tie vest wallet watch
        airport bank bridge castle church farm garage garden harbor hospital hotel house library market
        museum office palace park prison school shop station temple theater tower village
        arrow axe bow cannon dagger helmet shield spear sword
        atom cloud comet earth flame frost galaxy moon planet rain rainbow snow storm star sun thunder wind
        album book card diary letter map novel paper pencil poem stamp ticket
        bottle bowl candle clock cup fork glass jar kettle knife ladle mug oven pan plate pot spoon tray
        bicycle boat bus car engine ferry plane rocket ship sled taxi tractor train truck wagon wheel
        ant bee beetle crab frog moth owl snail spider swan wasp worm
        acorn branch bush cactus daisy fern flower grass leaf lily moss oak palm pine rose seed tree tulip
        copper gold iron silver steel stone brick clay coal marble sand wood
        baby child doctor farmer king knight nurse pilot queen sailor soldier teacher
        """.split()
    + EXTRA_TRAIN_WORDS,
    "eval": """
        kiwi lime papaya guava apricot radish turnip spinach celery
        noodle yogurt walnut almond cashew pecan
        swamp prairie tundra lagoon marsh reef dune
        lizard turtle gecko walrus moose bison heron pelican
        stool bench cabinet dresser closet drawer
        sickle trowel pliers anvil
        cello oboe tuba lute
        """.split(),
}
NAMES = {
    "train": """Alice Bob Carol David Emma Frank Grace Henry Irene Jack Laura Mike Nina Oscar Paula Quentin
        Rachel Sam Tina Victor Wendy Xavier Yara Zack Hugo Iris Leo Mia Noah Olga""".split(),
    "eval": """Bianca Conrad Delia Elias Fiona Gustav Helena Ivan Julia Kasper Lydia Marco Nadia Otto
        Petra""".split(),
}
CITIES = {
    "train": """Paris London Berlin Madrid Rome Vienna Prague Dublin Lisbon Oslo Warsaw Athens Tokyo Seoul
        Chicago Boston Denver Sydney Toronto Cairo""".split(),
    "eval": """Lyon Munich Seville Milan Krakow Porto Bergen Osaka Dallas Perth Quebec Nairobi""".split(),
}
COUNTRIES = {
    "train": """France Germany Spain Italy Austria Ireland Portugal Norway Poland Greece Japan Canada Egypt
        Brazil Mexico""".split(),
    "eval": """Chile Peru Kenya Finland Denmark Belgium Vietnam Morocco""".split(),
}
JOBS = {
    "train": """teacher doctor nurse pilot chef farmer lawyer painter baker plumber writer singer""".split(),
    "eval": """dentist architect florist jeweler surgeon tailor""".split(),
}
COLORS = {
    "train": """red blue green yellow purple orange black white pink brown""".split(),
    "eval": """teal maroon violet beige indigo crimson""".split(),
}
JSON_FIELDS = ("name", "age", "city", "country", "job", "color")
JSON_POOLS = {"name": NAMES, "city": CITIES, "country": COUNTRIES, "job": JOBS, "color": COLORS}
# Half the train values are arbitrary vocabulary words, so the expert learns to copy any value; trained on
# the short lists alone it rewrote unseen ones ("tailor" -> "tacky", "Otto" -> "Otter").
_EVAL_VALUES = {v.lower() for pool in JSON_POOLS.values() for v in pool["eval"]}
JSON_EXTRA_TRAIN_VALUES = [w for w in EXTRA_TRAIN_WORDS if w not in _EVAL_VALUES]


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


# -----------------------------------------------------------------------------
# generators


def _arithmetic(rng: random.Random, split: str) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    return Example("arithmetic", f"Compute: {a} {op} {b}", str(a + b if op == "+" else a - b))


def _pseudo_word(rng: random.Random, initial: str) -> str:
    """A made-up word like "tebolu": letters alternating consonant/vowel, 4 to 8 long, split by the
    tokenizer into a few pieces. Unlike vocabulary words it cannot be memorised, every initial is as
    likely as any other, and its first letter has to be read off its first token."""
    word, length = initial, rng.randint(4, 8)
    while len(word) < length:
        word += rng.choice(_VOWELS if word[-1] not in _VOWELS else _CONSONANTS)
    return word


_VOWELS, _CONSONANTS = "aeiou", "bcdfghjklmnprstvwz"
_EVAL_WORDS = set(WORDS["eval"])


def _sorting(rng: random.Random, split: str, pseudo_words: float = 0.0) -> Example:
    # distinct first letters: the order follows from each word's initial, which a 135M model can learn;
    # ties broken on later letters were most of its mistakes
    n, words, initials = rng.randint(3, 6), [], set()
    while len(words) < n:
        if pseudo_words > 0 and rng.random() < pseudo_words:  # no extra draw when off: same data as before
            initial = rng.choice(sorted(set("abcdefghijklmnopqrstuvwxyz") - initials))
            word = _pseudo_word(rng, initial)
            if word in _EVAL_WORDS:
                continue
        else:
            word = rng.choice(WORDS[split])
        if word[0] not in initials:
            words.append(word)
            initials.add(word[0])
    return Example("sorting", "Sort alphabetically: " + ", ".join(words), ", ".join(sorted(words)))


def _json_value(rng: random.Random, key: str, split: str) -> str | int:
    if key == "age":
        return rng.randint(18, 90)
    if split == "train" and rng.random() < 0.5:
        word = rng.choice(JSON_EXTRA_TRAIN_VALUES)
        return word.capitalize() if key in ("name", "city", "country") else word
    return rng.choice(JSON_POOLS[key][split])


def _json(rng: random.Random, split: str) -> Example:
    keys = rng.sample(JSON_FIELDS, rng.randint(2, 4))  # keys in the order given in the prompt
    record = {k: _json_value(rng, k, split) for k in keys}
    prompt = "Extract as JSON: " + ", ".join(f"{k} is {v}" for k, v in record.items())
    return Example("json", prompt, json.dumps(record))


_GENERATORS = {"arithmetic": _arithmetic, "sorting": _sorting, "json": _json}


def make_examples(task: str, n: int, seed: int, split: str = "train", pseudo_words: float = 0.0) -> list[Example]:
    """n examples of one task. Deterministic; the eval split uses its own seed stream and vocabulary.

    pseudo_words (sorting, train split): the fraction of words that are made up rather than drawn from
    the vocabulary."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")
    if not 0.0 <= pseudo_words <= 1.0:
        raise ValueError(f"pseudo_words must be in [0, 1], got {pseudo_words}")
    if pseudo_words and (task != "sorting" or split != "train"):
        raise ValueError("pseudo_words applies to the sorting task's train split only")
    rng = random.Random(f"{task}/{split}/{seed}")  # str seeds are stable across runs and processes
    if pseudo_words:
        return [_sorting(rng, split, pseudo_words) for _ in range(n)]
    return [_GENERATORS[task](rng, split) for _ in range(n)]


def make_mixed(n: int, seed: int, split: str = "train", tasks: tuple[str, ...] = TASKS) -> list[Example]:
    """n examples interleaving the tasks round-robin: arithmetic, sorting, json, arithmetic, ..."""
    per_task = [make_examples(t, -(-n // len(tasks)), seed, split) for t in tasks]
    return [per_task[i % len(tasks)][i // len(tasks)] for i in range(n)]


# -----------------------------------------------------------------------------
# tokenization for causal-LM fine-tuning


def _ids(encoded) -> list[int]:
    # apply_chat_template returns a BatchEncoding in transformers 5 and a plain list in 4
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant header (where generation starts)."""
    messages = [{"role": "user", "content": prompt}]
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def end_of_turn_token(tokenizer) -> str:
    """The token the chat template closes an assistant turn with (SmolLM2: <|im_end|>), else eos.

    Found by rendering a turn around a sentinel and reading what follows it, so any template works.
    """
    sentinel = "XLORA_SENTINEL"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    tail = rendered.split(sentinel, 1)[-1].strip()
    for token in tokenizer.all_special_tokens:
        if tail.startswith(token):
            return token
    return tokenizer.eos_token


def encode_example(tokenizer, example: Example) -> dict[str, list[int]]:
    """input_ids = prompt + answer + end-of-turn; labels = -100 over the prompt, so loss is on the answer."""
    prompt = prompt_ids(tokenizer, example.prompt)
    answer = tokenizer(example.answer + end_of_turn_token(tokenizer), add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def collate(batch: list[dict[str, list[int]]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad input_ids/labels to the longest in the batch; attention_mask marks the real tokens."""
    width = max(len(b["input_ids"]) for b in batch)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for b in batch:
        n, pad = len(b["input_ids"]), width - len(b["input_ids"])
        labels = b.get("labels", b["input_ids"])
        rows = (b["input_ids"], labels, [1] * n)
        fills = (pad_id, IGNORE_INDEX, 0)
        for key, row, fill in zip(out, rows, fills, strict=True):
            out[key].append(row + [fill] * pad if padding_side == "right" else [fill] * pad + row)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


# -----------------------------------------------------------------------------
# scoring


def exact_match(prediction: str, answer: str) -> bool:
    """Whitespace-insensitive at the ends; JSON answers are compared parsed, key order included."""
    prediction, answer = prediction.strip(), answer.strip()
    if answer.startswith("{"):
        try:
            got, want = json.loads(prediction), json.loads(answer)
        except json.JSONDecodeError:
            return False
        return got == want and isinstance(got, dict) and list(got) == list(want)
    return prediction == answer
