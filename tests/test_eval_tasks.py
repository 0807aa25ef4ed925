"""Quality-harness tasks: exact prompt lengths, planted answers, scoring (no engine)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

import pytest

from keepkv_vllm.eval.harness import aggregate, markdown, score_rows
from keepkv_vllm.eval.tasks import DEFAULT_GRID, QUICK_GRID, TASKS, EvalItem, TaskBuilder


@pytest.fixture(scope="module")
def builder():
    from transformers import AutoTokenizer

    from keepkv_vllm.assets import model_dir

    return TaskBuilder(AutoTokenizer.from_pretrained(str(model_dir())))


@pytest.mark.parametrize("length", [700, 1024, 2048])
def test_needle_style_prompts_have_the_exact_length_and_contain_the_answer(builder, length):
    tok = builder.tokenizer
    for item in (builder.needle(length, 0.4, 1), builder.multikey(length, 3), builder.vartrack(length, 2)):
        assert len(item.prompt_ids) == length, item.name
        text = tok.decode(item.prompt_ids)
        assert all(a in text for a in item.answers), item.name


def test_multikey_asks_for_one_of_several_planted_keys(builder):
    item = builder.multikey(2048, 0, num_keys=4)
    text = builder.tokenizer.decode(item.prompt_ids)
    assert text.count("One of the special magic numbers for") == 4
    assert text.count(item.answers[0]) == 1


def test_vartrack_chain_is_planted_in_order(builder):
    item = builder.vartrack(2048, 5, hops=4)
    text = builder.tokenizer.decode(item.prompt_ids)
    names = item.answers
    assert len(names) == 5
    positions = [text.index(f"VAR {n} =") for n in names]
    assert positions == sorted(positions)
    for a, b in zip(names, names[1:], strict=False):
        assert f"VAR {b} = VAR {a}." in text


def test_cwe_common_words_are_the_most_frequent(builder):
    item = builder.cwe(1024, 0)
    assert len(item.prompt_ids) <= 1024
    text = builder.tokenizer.decode(item.prompt_ids)
    words = [line.split(". ", 1)[1] for line in text.splitlines() if line[:1].isdigit() and ". " in line]
    counts = collections.Counter(words)
    assert {w for w, _ in counts.most_common(10)} == set(item.answers)
    assert min(counts[w] for w in item.answers) > max(c for w, c in counts.items() if w not in item.answers)


def test_perplexity_continuation_follows_the_context(builder):
    item = builder.perplexity(512, 32, 0)
    assert len(item.prompt_ids) == 512 and len(item.forced_ids) == 32 and item.max_tokens == 32
    bible = builder._bible_ids()
    start = next(i for i in range(len(bible)) if bible[i : i + 512] == item.prompt_ids)
    assert tuple(bible[start + 512 : start + 544]) == item.forced_ids


def test_items_are_deterministic_and_grids_build(builder):
    assert builder.multikey(1024, 7).prompt_ids == builder.multikey(1024, 7).prompt_ids
    quick = QUICK_GRID.build(builder, TASKS)
    assert {i.task for i in quick} == set(TASKS)
    assert len({i.name for i in quick}) == len(quick)
    assert len(DEFAULT_GRID.build(builder, ("needle",))) == len(DEFAULT_GRID.needle_lengths) * len(
        DEFAULT_GRID.needle_depths
    )
    with pytest.raises(ValueError, match="unknown task"):
        QUICK_GRID.build(builder, ("ruler",))


def test_scoring_matches_whole_answers_only():
    item = EvalItem("vartrack", "v", [1], 8, answers=("ABCDE", "FGHIJ"))
    assert item.score("VAR ABCDE and FGHIJ") == 1.0
    assert item.score("ABCDEF, FGHIJ") == 0.5
    assert EvalItem("needle", "n", [1], 8, answers=("4512",)).score("It is 45123.") == 0.0


def test_rows_without_compression_are_invalid_and_not_scored():
    items = [
        EvalItem("needle", "n", [1], 8, answers=("42",)),
        EvalItem("perplexity", "p", [1], 2, forced_ids=(5, 6)),
    ]
    rows = [
        {"method": "none", "budget": None, "item": 0, "text": "42", "counters": {}},
        {"method": "h2o", "budget": 0.2, "item": 0, "text": "42", "counters": {}},  # never compressed
        {"method": "keepkv", "budget": 0.2, "item": 0, "text": "41", "counters": {"slots_removed": 9}},
        {
            "method": "none",
            "budget": None,
            "item": 1,
            "text": "",
            "counters": {},
            "logprobs": [-1.0, -3.0],
            "forced_ok": True,
        },
        {
            "method": "keepkv",
            "budget": 0.2,
            "item": 1,
            "text": "",
            "counters": {"slots_removed": 9, "entries_merged": 4},
            "logprobs": [-2.0, -2.0],
            "forced_ok": True,
        },
    ]
    table = {(ln["method"], ln["task"]): ln for ln in aggregate(score_rows(items, rows))}
    assert table[("none", "needle")]["value"] == 100.0
    assert table[("h2o", "needle")]["value"] is None and table[("h2o", "needle")]["valid"] == 0
    assert table[("keepkv", "needle")]["value"] == 0.0
    assert table[("none", "perplexity")]["value"] == pytest.approx(2.718281828**2)
    assert table[("keepkv", "perplexity")]["mean_entries_merged"] == 4
    md = markdown(aggregate(score_rows(items, rows)), [0.2])
    assert "| needle | h2o | invalid (0/1 valid) |" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budgets", "1.5"], "a budget is a fraction in (0, 1]"),
        (["--depths", "x"], "not a number"),
        (["--kv-compression-config", '{"window": 64}'], "min_budget_tokens (64) must exceed sink + window"),
        (["--kv-compression-config", '{"window": 6'], "not valid JSON"),
        (["--kv-compression-config", '{"colour": 1}'], "colour"),
        (
            ["--methods", "keepkv", "snapkv", "--kv-compression-config", '{"method_options": {"recent": 9}}'],
            "method_options in --kv-compression-config belong to one method",
        ),
        (["--methods", "snapkv", "--kv-compression-config", '{"method_options": {"pool": 9}}'], "pool"),
        (["--mode", "pressure", "--tasks", "needle", "perplexity"], "perplexity needs --mode always"),
    ],
)
def test_bad_cli_input_is_one_line_before_any_engine_starts(argv, message, capsys):
    from keepkv_vllm.eval.harness import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", "/nonexistent/never-written", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("keepkv-eval: error:") and message in err[-1]


def test_intervals_match_their_definitions():
    from keepkv_vllm.eval.intervals import perplexity_interval, wilson

    low, high = wilson(12, 30)  # textbook value: 0.246 .. 0.577
    assert (round(low, 3), round(high, 3)) == (0.246, 0.577)
    assert wilson(0, 9)[0] == 0.0 and wilson(9, 9)[1] == 1.0
    # two chunks of mean NLL 1 and 3: mean 2, standard error 1
    low, high = perplexity_interval([[-1.0] * 16 + [-3.0] * 16])
    assert low == pytest.approx(math.exp(2 - 1.959964)) and high == pytest.approx(math.exp(2 + 1.959964))
    assert perplexity_interval([[-1.0] * 16]) is None  # one chunk: no spread to estimate


def test_every_score_cell_shows_its_items_and_interval():
    from keepkv_vllm.eval.harness import markdown

    line = {"budget": 0.1, "valid": 30, "total": 30, "value": 40.0, "score_sum": 12, "interval": (24.6, 57.7)}
    ppl = {"budget": 0.1, "valid": 2, "total": 2, "value": 18.02, "interval": (17.5, 18.6)}
    md = markdown(
        [
            {**line, "method": "keepkv", "task": "needle"},
            {**ppl, "method": "keepkv", "task": "perplexity"},
        ],
        [0.1],
    )
    assert "| needle | keepkv | **40 (12/30; 25–58)** |" in md
    assert "| perplexity | keepkv | **18.02 (17.50–18.60)** |" in md


def _eval_json(tmp_path, name: str, method: str, rows: list[tuple[str, str, float]]) -> str:
    """An eval.json with one request per (task, item, score-or-nll) at budget 0.1."""
    requests = []
    for task, item, x in rows:
        r = {"method": method, "budget": 0.1, "task": task, "name": item, "valid": True}
        r |= {"score": x} if task == "needle" else {"nll": x, "meta": {"scored": 4}}
        requests.append(r)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"requests": requests}))
    return str(path)


def test_paired_comparison_counts_items_and_passages_exactly(tmp_path, capsys):
    from keepkv_vllm.eval.compare import compare_needle, compare_perplexity, item_scores, main

    a = _eval_json(
        tmp_path, "a", "keepkv",
        [("needle", "n0", 1.0), ("needle", "n1", 1.0), ("needle", "n2", 0.0), ("needle", "n3", 1.0),
         ("perplexity", "p0", 8.0), ("perplexity", "p1", 4.0), ("perplexity", "p2", 12.0)],
    )  # fmt: skip
    b = _eval_json(
        tmp_path, "b", "streamingllm",
        [("needle", "n0", 1.0), ("needle", "n1", 0.0), ("needle", "n2", 1.0), ("needle", "n3", 0.0),
         ("perplexity", "p0", 4.0), ("perplexity", "p1", 4.0), ("perplexity", "p2", 4.0)],
    )  # fmt: skip
    needle = compare_needle(
        item_scores(a, "keepkv", "needle", 0.1), item_scores(b, "streamingllm", "needle", 0.1)
    )
    assert (needle.items, needle.both, needle.only_first, needle.only_second) == (4, 1, 2, 1)
    ppl = compare_perplexity(
        item_scores(a, "keepkv", "perplexity", 0.1), item_scores(b, "streamingllm", "perplexity", 0.1)
    )
    # per-token differences 1, 0, 2: mean 1, sd 1, t = 1 / (1 / sqrt 3)
    assert ppl.passages == 3 and ppl.mean_difference == 1.0 and ppl.first_better == 0
    assert ppl.t == pytest.approx(math.sqrt(3))
    main([f"{a}:keepkv", f"{b}:streamingllm", "--budgets", "0.1"])
    out = capsys.readouterr().out
    assert "needle @0.1: 4 items, both 1, only first 2, only second 1" in out
    assert "perplexity @0.1: 3 passages, first - second +1.000 nats/token, t 1.73, first better on 0/3" in out


@pytest.mark.parametrize("length", [2048, 4096])
@pytest.mark.parametrize(
    "haystack, kind", [("noise", "number"), ("essay", "number"), ("essay", "word"), ("essay", "uuid")]
)
def test_ruler_single_needles_have_the_exact_length_one_needle_and_its_value(builder, length, haystack, kind):
    item = builder.niah(length, 7, haystack, kind)
    text = builder.tokenizer.decode(item.prompt_ids)
    assert item.task == "niah_single" and len(item.prompt_ids) == length
    assert text.count("One of the special magic") == 1 and text.count(item.answers[0]) >= 1
    assert ("The river runs to the sea." in text) == (haystack == "noise")
    if kind == "uuid":
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", item.answers[0]
        )
    assert builder.niah(length, 7, haystack, kind).prompt_ids == item.prompt_ids  # seeded


def test_ruler_multikey_hides_the_asked_needle_among_distractors_of_the_same_form(builder):
    item = builder.niah(2048, 3, "noise", "number", keys=4)
    text = builder.tokenizer.decode(item.prompt_ids)
    keys = re.findall(r"One of the special magic numbers for (\w+) is: (\d{7})\.", text)
    assert item.task == "niah_multikey" and len(keys) == 4 and len({k for k, _ in keys}) == 4
    asked = re.search(r"Which special magic numbers for (\w+) does", text).group(1)
    assert [v for k, v in keys if k == asked] == list(item.answers)


def test_ruler_multivalue_asks_for_every_value_of_one_key(builder):
    item = builder.niah(2048, 3, "noise", "number", values=4)
    text = builder.tokenizer.decode(item.prompt_ids)
    keys = re.findall(r"One of the special magic numbers for (\w+) is: (\d{7})\.", text)
    assert item.task == "niah_multivalue" and len(item.answers) == 4
    assert {k for k, _ in keys} == {keys[0][0]} and sorted(v for _, v in keys) == sorted(item.answers)
    assert item.score(" ".join(item.answers[:2])) == 0.5  # every value counts


def test_the_ruler_needle_grid_cycles_the_single_needle_variants():
    from keepkv_vllm.eval.tasks import NIAH_SINGLE_VARIANTS

    class Builder:
        def niah(self, n, s, haystack, kind, keys=1, values=1):
            return (n, s, haystack, kind, keys, values)

    grid = dataclasses.replace(QUICK_GRID, ruler_lengths=(2048,), ruler_seeds=8)
    single = grid.build(Builder(), ("niah_single",))
    assert [(h, k) for _, _, h, k, _, _ in single] == list(NIAH_SINGLE_VARIANTS) * 2
    assert all(x[4] == 4 for x in grid.build(Builder(), ("niah_multikey",)))
    assert all(x[5] == 4 for x in grid.build(Builder(), ("niah_multivalue",)))
