"""The shipped replay prompt set (shards/data/replay_prompts.jsonl): varied text-only instructions for
`python -m shards.replay`, built from written topics x instruction forms.

    python -m shards.replay_prompts            # rewrite shards/data/replay_prompts.jsonl
    python -m shards.replay_prompts --check    # exit 1 when the committed file is not what this script builds

Why built and not hand-listed: the set must be large (hundreds of prompts), varied (explanations, how-tos, writing,
arithmetic, language, classification, opinion) and reproducible; a reader edits the lists below, not 600 lines.
It must also stay disjoint from the retention prompts (pipeline/eval/text_prompts.jsonl): retention measures how
well the trained model keeps the frozen LLM's answers on prompts it never trained on, so a replay prompt equal to
one of them, or sharing any 8-word sequence with one, is an error here (`overlaps`), not silently dropped.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from importlib import resources
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "replay_prompts.jsonl"
NGRAM = 8

# fmt: off
CONCEPTS = [
    "the water cycle", "plate tectonics", "how vaccines work", "black holes", "the greenhouse effect",
    "compound interest", "supply and demand", "the immune system", "magnetism", "erosion", "the food chain",
    "how a rainbow forms", "the phases of the Moon", "static electricity", "recycling", "the human skeleton",
    "ocean tides", "volcanoes", "earthquakes", "the internet", "how a refrigerator keeps food cold", "gravity",
    "fossils", "coral reefs", "the printing press", "democracy", "inflation", "migration of birds", "sound waves",
    "renewable energy", "how bread rises", "the digestive system", "password security", "sleep", "friction",
    "evaporation", "the Roman Empire", "the seasons on other planets", "encryption", "deserts", "the heart rate",
    "batteries", "how maps show height", "clouds", "honeybee colonies", "the metric system", "algorithms",
    "composting", "the Olympic Games", "libraries",
]
CONCEPT_FORMS = [
    "Explain {t} in two or three sentences.",
    "Explain {t} to a ten-year-old.",
    "Give three short facts about {t}.",
    "What is a common misconception about {t}?",
    "Describe {t} using a simple everyday analogy.",
    "Why does {t} matter in everyday life?",
    "Write a four-line poem about {t}.",
    "List three questions a curious student might ask about {t}.",
    "Write a short quiz question about {t} and give its answer.",
    "Summarise what you know about {t} in one short paragraph.",
]
CONCEPT_FORMS_PER_TOPIC = 5

TASKS = [
    "boil an egg", "change a flat bicycle tyre", "write a cover letter", "plant tomato seeds", "back up a laptop",
    "make a cup of green tea", "start running as a beginner", "clean a cast iron pan", "learn a new language",
    "prepare for a job interview", "save money on groceries", "fold a paper airplane", "care for a houseplant",
    "set up a weekly budget", "make a simple tomato sauce", "teach a dog to sit", "write a clear email subject",
    "stay focused while working from home", "pack a suitcase for a week", "make friends in a new city",
    "read a nutrition label", "give a short speech", "organise a small birthday party",
    "take a good photo with a phone", "wash a wool jumper", "keep a journal", "choose a good book to read",
    "make pancakes", "sharpen a kitchen knife", "calm down before an exam",
]
TASK_FORMS = [
    "How do I {t}? Give short numbered steps.",
    "What mistakes do people often make when they {t}?",
    "Give one tip for someone who wants to {t} for the first time.",
    "What do I need before I {t}?",
]
TASK_FORMS_PER_TOPIC = 3

WRITING = [
    ("Write a limerick about {s}.",
     ["a forgetful wizard", "a lazy cat", "a rainy Monday", "a talking teapot", "a lost sock", "a sleepy owl"]),
    ("Write the opening line of a mystery story set in {s}.",
     ["a lighthouse", "an old train station", "a bakery", "a museum at night", "a mountain village"]),
    ("Write a two-sentence story about {s}.",
     ["a robot learning to paint", "a dragon who is afraid of fire", "the last leaf on a tree",
      "a message in a bottle", "a snowman in spring"]),
    ("Write a short product description for {s}.",
     ["a reusable water bottle", "a solar-powered lamp", "a pair of hiking boots", "a wooden chess set",
      "a noise-cancelling headset"]),
    ("Write a short thank-you note to {s}.",
     ["a neighbour who watered my plants", "a teacher at the end of term", "a friend who helped me move house",
      "a nurse who cared for my aunt"]),
    ("Write a polite message declining an invitation to {s}.",
     ["a wedding", "a board game night", "a work dinner", "a weekend camping trip"]),
    ("Write a slogan for {s}.",
     ["a bicycle shop", "a city library", "a vegetable market", "a swimming school", "a recycling campaign"]),
    ("Write a short dialogue between {s}.",
     ["a customer and a shopkeeper", "two astronauts on Mars", "a chef and a food critic",
      "a grandparent and a grandchild"]),
]

SENTENCES = [
    "me and him goes to the park every days", "she dont like apples but she eat them anyway",
    "there is many reasons to learn coding", "the childrens was playing outside until it get dark",
    "I has finished my homework yesterday", "we was late because the bus were slow",
]
INFORMAL = [
    "hey, can u send me the report asap?", "the meeting got moved, just so you know",
    "sorry, can't make it tomorrow, something came up", "thanks a ton for the help yesterday!",
    "gonna need a bit more time on this one",
]
WORDS = ["brave", "fragile", "generous", "rapid", "quiet", "bright", "calm", "honest", "tiny"]
VERBS = ["swim", "catch", "think", "bring", "fly", "begin", "teach", "write"]
PHRASES = [
    ("thank you very much", "French"), ("where is the train station", "German"), ("I would like a coffee", "Italian"),
    ("see you tomorrow", "Portuguese"), ("how much does this cost", "Spanish"), ("happy birthday", "Dutch"),
]
ANIMALS = ["dolphin", "penguin", "salamander", "shark", "bat", "crocodile", "ostrich", "whale", "frog", "lizard"]
ODD_ONE_OUT = [
    ("apple", "banana", "carrot", "cherry"), ("violin", "guitar", "trumpet", "cello"),
    ("Mars", "Venus", "Jupiter", "Sirius"), ("oak", "maple", "tulip", "birch"),
    ("square", "triangle", "circle", "cube"), ("copper", "iron", "wood", "silver"),
]
PAIRS = [
    ("a virus", "a bacterium"), ("a lake", "a sea"), ("a fruit", "a vegetable"), ("speed", "velocity"),
    ("a comet", "an asteroid"), ("an alligator", "a crocodile"), ("baking soda", "baking powder"), ("a poem", "a song"),
    ("a city", "a town"), ("hardware", "software"), ("a loan", "a gift"), ("a hurricane", "a tornado"),
    ("empathy", "sympathy"), ("a mountain", "a hill"),
]
HEAVIER = [
    ("a bowling ball", "a football"), ("a litre of water", "a litre of oil"), ("an elephant", "a horse"),
    ("a brick", "a feather"), ("a car", "a bicycle"),
]
OPINIONS = [
    "working from home", "electric cars", "living in a big city", "online learning", "school uniforms",
    "social media for teenagers", "a four-day work week", "self-driving buses", "public transport", "keeping a pet",
    "reading e-books instead of paper books", "learning to code at school",
]
OPINION_FORMS = [
    "What are two advantages and two disadvantages of {t}?", "Argue briefly for {t}.", "Argue briefly against {t}.",
]
# fmt: on


def _concepts(rng: random.Random) -> list[str]:
    out = []
    for t in CONCEPTS:
        out += [f.format(t=t) for f in rng.sample(CONCEPT_FORMS, CONCEPT_FORMS_PER_TOPIC)]
    return out


def _tasks(rng: random.Random) -> list[str]:
    out = []
    for t in TASKS:
        out += [f.format(t=t) for f in rng.sample(TASK_FORMS, TASK_FORMS_PER_TOPIC)]
    return out


def _arithmetic(rng: random.Random) -> list[str]:
    out = []
    for _ in range(12):
        a, b = rng.randint(12, 95), rng.randint(3, 19)
        out.append(f"A box holds {b} pencils. How many pencils are in {a} boxes? Show your working.")
    for _ in range(10):
        a, b = rng.randint(101, 999), rng.randint(101, 999)
        out.append(f"Add {a} and {b}, then subtract 100 from the result.")
    for _ in range(8):
        p, n = rng.choice([10, 15, 20, 25, 40, 75]), rng.choice([40, 80, 120, 240, 360])
        out.append(f"What is {p} percent of {n}?")
    for n in rng.sample(range(20, 120), 8):
        out.append(f"Is {n} a prime number? Explain how you know.")
    for h in rng.sample(range(2, 12), 5):
        out.append(f"A train travels at 80 km per hour for {h} hours. How far does it go?")
    for _ in range(5):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        out.append(f"If a recipe needs {a} eggs for one cake, how many eggs do {b} cakes need?")
    return out


def _language() -> list[str]:
    out = [f"Correct the grammar of this sentence: '{s}'." for s in SENTENCES]
    out += [f"Rewrite this message in a formal tone: '{s}'" for s in INFORMAL]
    out += [f"Give a synonym and an antonym for '{w}'." for w in WORDS]
    out += [f"Use the word '{w}' in a sentence about the weather." for w in WORDS]
    out += [f"What are the past tense and past participle of '{v}'?" for v in VERBS]
    out += [f"Translate '{p}' into {lang}." for p, lang in PHRASES]
    return out


def _reasoning() -> list[str]:
    out = [f"Is a {a} a mammal, a bird, a reptile, an amphibian or a fish?" for a in ANIMALS]
    out += [f"Which word does not belong, and why: {', '.join(g)}?" for g in ODD_ONE_OUT]
    out += [f"What is the difference between {a} and {b}?" for a, b in PAIRS]
    out += [f"Which is heavier, {x} or {y}? Explain briefly." for x, y in HEAVIER]
    return out


def build() -> list[dict]:
    """Every prompt once, in a seeded shuffled order (categories interleave, so a prefix of the file is varied)."""
    rng = random.Random(0)
    prompts = _concepts(rng) + _tasks(rng) + _arithmetic(rng) + _language() + _reasoning()
    prompts += [form.format(s=s) for form, subjects in WRITING for s in subjects]
    prompts += [f.format(t=t) for t in OPINIONS for f in OPINION_FORMS]
    prompts = list(dict.fromkeys(prompts))  # a repeated arithmetic draw once
    rng.shuffle(prompts)
    return [{"id": f"r{i:04d}", "prompt": p} for i, p in enumerate(prompts)]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def overlaps(prompts: list[str], held_out: list[str], n: int = NGRAM) -> list[str]:
    """Replay prompts equal to a held-out prompt (case and punctuation aside) or sharing an n-word sequence."""
    held_text = {" ".join(words(h)) for h in held_out}
    held_grams = set().union(*(ngrams(h, n) for h in held_out)) if held_out else set()
    return [p for p in prompts if " ".join(words(p)) in held_text or ngrams(p, n) & held_grams]


def retention_prompts() -> list[str]:
    text = resources.files("pipeline.eval").joinpath("text_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.replay_prompts", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"output JSONL (default {OUT})")
    p.add_argument("--check", action="store_true", help="compare --out with the build instead of writing it")
    a = p.parse_args(argv)
    rows = build()
    clash = overlaps([r["prompt"] for r in rows], retention_prompts())
    if clash:
        print(f"error: {len(clash)} prompt(s) overlap pipeline/eval/text_prompts.jsonl: {clash[:5]}", file=sys.stderr)
        return 1
    if a.check:
        same = a.out.is_file() and a.out.read_text() == render(rows)
        print(f"{a.out}: {'up to date' if same else 'differs from the build: rerun python -m shards.replay_prompts'}")
        return 0 if same else 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(render(rows))
    print(f"{a.out}: {len(rows)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
