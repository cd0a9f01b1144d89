"""Offline corpus and tasks built from WordNet 3.0 (Debian package ``wordnet-base``; licence in NOTICE).

Synsets are split once, by a hash of their offset, into a pretraining pool (90%) and a task pool (10%), so the
built-in tasks are held out from the built-in base models' pretraining text.

- corpus: one line per pretraining synset, ``<lemma>, <lemma> (<pos>): <gloss>``.
- ``wn-category``: a noun gloss -> its lexicographer category, one of 10 digits (classification; 0 animal, 1 plant,
  2 food, 3 person, 4 artifact, 5 location, 6 body, 7 substance, 8 act, 9 communication).
- ``wn-define``: a word -> its gloss (generation, scored with ROUGE-L).
- ``wn-pos``: a gloss -> the part of speech of its word (0 noun, 1 verb, 2 adjective, 3 adverb; classification).
- ``wn-pos-long``: 4-24 distractor glosses, then a target gloss -> the target's part of speech; the question sits at
  the end of a long input, where the influence of a prompt or initial state has decayed (docs/methods.md §4.4, §5.1).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ssmtune.utils.io import atomic_write_text

WORDNET_DIR = Path("/usr/share/wordnet")
TASKS_DIR = Path(__file__).parent / "tasks"

# lexnames(5WN): file number -> lexicographer file name.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl"
]  # fmt: skip

# The 10 classes of the classification tasks, label = index (a single digit token).
CATEGORIES = (
    "noun.animal", "noun.plant", "noun.food", "noun.person", "noun.artifact",
    "noun.location", "noun.body", "noun.substance", "noun.act", "noun.communication",
)  # fmt: skip
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
# Classes of the part-of-speech tasks, label = index.
POS_CLASSES = ("noun", "verb", "adjective", "adverb")


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str
    lexname: str
    words: tuple[str, ...]
    gloss: str

    @property
    def held_out(self) -> bool:
        """True for the 10% task pool (stable across machines: a hash, not Python's salted hash())."""
        return int(hashlib.sha1(f"{self.pos}{self.offset}".encode()).hexdigest(), 16) % 10 == 0

    @property
    def definition(self) -> str:
        """The gloss without its quoted usage examples."""
        return self.gloss.split('; "')[0].strip()


def read_synsets(wordnet_dir: Path = WORDNET_DIR) -> Iterator[Synset]:
    for part in ("noun", "verb", "adj", "adv"):
        path = Path(wordnet_dir) / f"data.{part}"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: install Debian's wordnet-base (apt-get install wordnet-base)")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                n_words = int(fields[3], 16)
                words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(n_words))
                yield Synset(fields[0], fields[2], LEXNAMES[int(fields[1])], words, gloss.strip())


def build_corpus(out: Path, wordnet_dir: Path = WORDNET_DIR) -> int:
    """Write the pretraining text (held-out synsets excluded); returns its size in bytes."""
    lines = [
        f"{', '.join(s.words[:3])} ({POS_NAMES[s.pos]}): {s.gloss}" for s in read_synsets(wordnet_dir) if not s.held_out
    ]
    random.Random(0).shuffle(lines)
    text = "\n".join(lines) + "\n"
    atomic_write_text(out, text)
    return len(text.encode())


def _category_prompt(gloss: str) -> str:
    return f"Gloss: {gloss}\nCategory:###"


def build_tasks(wordnet_dir: Path = WORDNET_DIR, out_dir: Path = TASKS_DIR, seed: int = 0) -> dict[str, dict[str, int]]:
    """Build the three task files (train/validation/test JSON lines, gzipped); returns the split sizes."""
    rng = random.Random(seed)
    pool = [s for s in read_synsets(wordnet_dir) if s.held_out]
    rng.shuffle(pool)
    nouns = [s for s in pool if s.lexname in CATEGORIES and len(s.definition) >= 12]
    # Balance the classes: at most 180 examples each.
    per_class: dict[str, list[Synset]] = {c: [] for c in CATEGORIES}
    for s in nouns:
        if len(per_class[s.lexname]) < 180:
            per_class[s.lexname].append(s)
    cls = [s for c in CATEGORIES for s in per_class[c]]
    rng.shuffle(cls)
    sizes: dict[str, dict[str, int]] = {}

    def split(rows: list[dict], n_val: int, n_test: int) -> dict[str, list[dict]]:
        return {"validation": rows[:n_val], "test": rows[n_val : n_val + n_test], "train": rows[n_val + n_test :]}

    category = [
        {
            "input": _category_prompt(s.definition),
            "target": str(CATEGORIES.index(s.lexname)),
            "label": CATEGORIES.index(s.lexname),
        }
        for s in cls
    ]
    define_pool = [s for s in pool if s.words and 12 <= len(s.definition) <= 160]
    define = [
        {"input": f"Define the {POS_NAMES[s.pos]} '{s.words[0]}':###", "target": s.definition}
        for s in define_pool[:2400]
    ]
    # Part of speech: balanced over the 4 classes, at most 450 each.
    per_pos: dict[str, list[Synset]] = {c: [] for c in POS_CLASSES}
    for s in pool:
        if len(s.definition) >= 12 and len(per_pos[POS_NAMES[s.pos]]) < 450:
            per_pos[POS_NAMES[s.pos]].append(s)
    pos_pool = [s for c in POS_CLASSES for s in per_pos[c]]
    rng.shuffle(pos_pool)
    pos = [
        {"input": f"Gloss: {s.definition}\nPart of speech:###", "target": str(POS_CLASSES.index(POS_NAMES[s.pos])),
         "label": POS_CLASSES.index(POS_NAMES[s.pos])}
        for s in pos_pool
    ]  # fmt: skip
    used = {s.offset + s.pos for s in pos_pool}
    distractors = [s.definition for s in pool if s.offset + s.pos not in used]
    long_rows = []
    for row, s in zip(pos, pos_pool):
        k = rng.randint(4, 24)
        context = " | ".join(rng.sample(distractors, k))
        long_rows.append({
            "input": f"Glosses: {context} | {s.definition}\nPart of speech of the last gloss:###",
            "target": row["target"], "label": row["label"], "n_distractors": k,
        })  # fmt: skip
    tasks = {
        "wn-pos": split(pos, 200, 300),
        "wn-category": split(category, 200, 300),
        "wn-define": split(define, 200, 200),
        "wn-pos-long": split(long_rows, 200, 300),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, splits in tasks.items():
        sizes[name] = {}
        for split_name, rows in splits.items():
            path = out_dir / f"{name}.{split_name}.jsonl.gz"
            # mtime=0: byte-identical output on every rebuild.
            with gzip.GzipFile(path, "wb", mtime=0) as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
            sizes[name][split_name] = len(rows)
    return sizes


def load_task(name: str, split: str) -> list[dict]:
    """Rows of a built-in task: name in ('wn-pos', 'wn-category', 'wn-define', 'wn-pos-long'), split in
    ('train', 'validation', 'test')."""
    path = TASKS_DIR / f"{name}.{split}.jsonl.gz"
    if not path.exists():
        known = sorted({p.name.split(".")[0] for p in TASKS_DIR.glob("*.jsonl.gz")})
        raise ValueError(
            f"unknown built-in task/split {name!r}/{split!r}; known tasks: {known}, splits: train, validation, test"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
