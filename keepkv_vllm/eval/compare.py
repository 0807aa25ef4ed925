"""Paired comparison of two keepkv-eval rows on the same items.

Two methods scored on the same prompts are compared item by item, which is much sharper than
comparing their two intervals: on the needle, the items only one of them finds (a row that
finds every item the other finds and one more is ahead, whatever the intervals say); on
perplexity, the per-passage difference in mean NLL per token, its mean, its t statistic over
the passages and the passages where the first row is better.

    python -m keepkv_vllm.eval.compare A/eval.json:keepkv B/eval.json:streamingllm --budgets 0.1 0.2

A row is ``FILE:METHOD`` (``none`` for the full cache, which has no budget).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NeedleComparison:
    items: int
    both: int
    only_first: int
    only_second: int


@dataclass(frozen=True)
class PerplexityComparison:
    passages: int
    mean_difference: float  # first - second, nats per token (negative: first is better)
    t: float  # mean / standard error over passages; 0 when every difference is equal
    first_better: int


def item_scores(path: Path, method: str, task: str, budget: float | None) -> dict[str, dict]:
    """The valid requests of one row, by item name."""
    requests = json.loads(Path(path).read_text())["requests"]
    return {
        r["name"]: r
        for r in requests
        if r["method"] == method
        and r["task"] == task
        and r.get("valid", True)
        and (method == "none" or r["budget"] == budget)
    }


def compare_needle(first: dict[str, dict], second: dict[str, dict]) -> NeedleComparison:
    names = sorted(first.keys() & second.keys())
    pairs = [(first[n]["score"] >= 1, second[n]["score"] >= 1) for n in names]
    return NeedleComparison(
        items=len(names),
        both=sum(a and b for a, b in pairs),
        only_first=sum(a and not b for a, b in pairs),
        only_second=sum(b and not a for a, b in pairs),
    )


def compare_perplexity(first: dict[str, dict], second: dict[str, dict]) -> PerplexityComparison:
    names = sorted(first.keys() & second.keys())
    diffs = [
        first[n]["nll"] / first[n]["meta"]["scored"] - second[n]["nll"] / second[n]["meta"]["scored"]
        for n in names
    ]
    if not diffs:
        raise ValueError("the two rows share no scored passage")
    mean = statistics.fmean(diffs)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    t = mean / (spread / math.sqrt(len(diffs))) if spread > 0 else 0.0
    return PerplexityComparison(len(diffs), mean, t, sum(d < 0 for d in diffs))


def _row(spec: str) -> tuple[Path, str]:
    path, sep, method = spec.rpartition(":")
    if not sep or not path or not method:
        raise argparse.ArgumentTypeError(f"a row is FILE:METHOD, got {spec!r}")
    return Path(path), method


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=_row, help="FILE:METHOD, e.g. results/a/eval.json:keepkv")
    parser.add_argument("second", type=_row, help="FILE:METHOD")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    args = parser.parse_args(argv)
    for budget in args.budgets:
        for task in ("needle", "perplexity"):
            rows = [item_scores(path, method, task, budget) for path, method in (args.first, args.second)]
            if rows[0] and rows[1]:
                print(f"{task} @{budget:g}: {describe(task, *rows)}")


def describe(task: str, first: dict[str, dict], second: dict[str, dict]) -> str:
    """One line comparing the two rows on ``task``."""
    if task == "needle":
        n = compare_needle(first, second)
        return f"{n.items} items, both {n.both}, only first {n.only_first}, only second {n.only_second}"
    p = compare_perplexity(first, second)
    return (
        f"{p.passages} passages, first - second {p.mean_difference:+.3f} nats/token, "
        f"t {p.t:.2f}, first better on {p.first_better}/{p.passages}"
    )


if __name__ == "__main__":
    main()
