"""Needle audit: what a compression does to the attention that *answers* a needle question.

The quality grid says whether the passcode came out; this says why not. For needle prompts
of SmolLM2-135M (transformers, offline, fp32) the right answer is appended and the whole
sequence is captured (post-RoPE queries, keys, values of every layer). Each layer's prompt
cache is compressed (observation window: the prompt's last ``window`` queries, as the engine
does at the first decode step); then the answer tokens' queries attend to the compressed
cache plus the answer's own keys, teacher-forced, and are compared with the full cache:

- ``answer error``: relative error of the attention output at the answer positions;
- ``needle kept``: share of the passcode's digit tokens still in the cache (per layer and
  kv-head), and the same over the *retrieval heads* alone (those whose answer queries give the
  digits >= 20 % of their attention under the full cache): those are the heads that answer;
- ``retrieval mass ratio``: attention those heads' answer queries give the passcode's slots
  (compressed: the output slots whose source is a digit, merged or not) over the full cache's:
  < 1 the needle faded, > 1 merged mass crowds onto it;
- ``foreign share``: for the passcode's slots that received merges, the share of their merge
  weight that came from tokens outside the passcode sentence (KeepKV's merge-weight plan).

    python -m keepkv_vllm.eval.needle_audit --variants keepkv keepkv-nomerge snapkv --budgets 0.1 0.2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from keepkv_vllm.attention.reference import causal_logits, vote_attention
from keepkv_vllm.eval.needle import NEEDLE_SENTENCE
from keepkv_vllm.eval.perturbation import VARIANTS, capture_qkv, load_model
from keepkv_vllm.methods import get_method
from keepkv_vllm.methods.base import KVCompressionMethod
from keepkv_vllm.methods.keepkv import KeepKV

RETRIEVAL_MASS = 0.2  # a head that gives the passcode >= this share of its answer attention


def passcode_positions(
    prompt_ids: list[int], sentence_ids: list[int], digits: list[int]
) -> tuple[list[int], list[int]]:
    """Positions of the passcode sentence and of its digit tokens inside the prompt."""
    n = len(sentence_ids)
    for start in range(len(prompt_ids) - n + 1):
        if prompt_ids[start : start + n] == sentence_ids:
            sentence = list(range(start, start + n))
            return sentence, [p for p in sentence if prompt_ids[p] in digits]
    raise ValueError("passcode sentence not found in the prompt")


def audit_layer(
    layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    context: int,
    window: int,
    method: KVCompressionMethod,
    budget: int,
    needle: list[int],
    sentence: list[int],
) -> dict[str, Any]:
    """One layer: answer error, and per kv-head the needle's mass (full, compressed) and
    whether its tokens were kept."""
    q, k, v = layer
    answer_q = q[:, context:]
    full = vote_attention(answer_q, k, v, causal=True)
    full_mass = _head_mass(answer_q, k, torch.ones(k.shape[:2], dtype=k.dtype), [needle] * k.shape[0])
    ck, cv = k[:, :context], v[:, :context]
    votes = torch.ones(ck.shape[:2], dtype=ck.dtype)
    queries = q[:, context - window : context]
    res = method.compress(ck, cv, votes, queries, budget)
    keys = torch.cat([res.keys, k[:, context:]], dim=1)
    values = torch.cat([res.values, v[:, context:]], dim=1)
    answer_votes = torch.ones(k.shape[0], k.shape[1] - context, dtype=res.votes.dtype)
    all_votes = torch.cat([res.votes, answer_votes], dim=1)
    out = vote_attention(answer_q, keys, values, all_votes, causal=True)
    # output slots whose source is a passcode token, per kv-head
    wanted = set(needle)
    kept = [[i for i, s in enumerate(row.tolist()) if s in wanted] for row in res.kept_index]
    return {
        "answer_error": float((out - full).norm() / full.norm()),
        "full_mass": full_mass,
        "mass": _head_mass(answer_q, keys, all_votes, kept),
        "kept": [len(r) / len(needle) for r in kept],
        "foreign_share": _foreign_share(method, (ck, cv, votes, queries), budget, needle, sentence),
    }


def _head_mass(
    queries: torch.Tensor, keys: torch.Tensor, votes: torch.Tensor, slots: list[list[int]]
) -> list[float]:
    """Per kv-head: mean attention mass (over answer queries and the head's query group) on
    that head's ``slots``."""
    logits = causal_logits(keys, queries, causal=True) + votes.log()[:, None, None, :]
    probs = torch.softmax(logits, dim=-1)  # [H_kv, G, Q, T]
    return [float(probs[h, :, :, s].sum(-1).mean()) for h, s in enumerate(slots)]


def _foreign_share(
    method: KVCompressionMethod,
    cache: tuple[torch.Tensor, ...],
    budget: int,
    needle: list[int],
    sentence: list[int],
) -> float:
    """Share of the merge weight landing on passcode slots that comes from outside its sentence."""
    if not isinstance(method, KeepKV):
        return 0.0
    keys, values, votes, queries = cache
    span = method.protected_span(budget, queries.shape[1])
    selection = method.select(keys, values, votes, queries, budget, span)
    plan = method.merge_plan(selection)
    inside, wanted = set(sentence), set(needle)
    foreign = total = 0.0
    for h in range(keys.shape[0]):
        heavy, evicted = selection.heavy[h].tolist(), selection.evicted[h].tolist()
        for e, t, w in zip(evicted, plan.target[h].tolist(), plan.evicted_weight[h].tolist(), strict=True):
            if w > 0 and heavy[t] in wanted:
                total += w
                foreign += 0.0 if e in inside else w
    return foreign / total if total else 0.0


def summarize(layers: list[dict[str, Any]]) -> dict[str, float]:
    """Averages over layers, and over the retrieval heads alone (where the answer reads the
    passcode: full-cache mass >= RETRIEVAL_MASS)."""
    heads = [
        (lay["full_mass"][h], lay["mass"][h], lay["kept"][h])
        for lay in layers
        for h in range(len(lay["kept"]))
    ]
    retrieval = [x for x in heads if x[0] >= RETRIEVAL_MASS]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {
        "answer_error": mean([lay["answer_error"] for lay in layers]),
        "needle_kept": mean([x[2] for x in heads]),
        "retrieval_heads": len(retrieval),
        "retrieval_kept": mean([x[2] for x in retrieval]),
        "retrieval_mass_ratio": mean([x[1] / x[0] for x in retrieval]),
        "foreign_share": mean([lay["foreign_share"] for lay in layers]),
    }


def run(
    lengths: tuple[int, ...],
    depths: tuple[float, ...],
    budgets: tuple[float, ...],
    variants: tuple[str, ...],
    window: int = 16,
) -> dict:
    from keepkv_vllm.eval.needle import NeedleFactory

    model, tok = load_model()
    factory = NeedleFactory(tok)
    rows = []
    for length in lengths:
        for i, depth in enumerate(depths):
            prompt = factory.make(length, depth, seed=1000 + i)
            answer = tok(prompt.passcode, add_special_tokens=False).input_ids
            sentence_ids = tok(
                NEEDLE_SENTENCE.format(passcode=prompt.passcode), add_special_tokens=False
            ).input_ids
            sentence, needle = passcode_positions(prompt.token_ids, sentence_ids, answer)
            layers = capture_qkv(model, torch.tensor([prompt.token_ids + answer]))
            for variant in variants:
                name, options = VARIANTS[variant]
                for b in budgets:
                    method = get_method(name, **options)
                    per_layer = [
                        audit_layer(layer, length, window, method, int(b * length), needle, sentence)
                        for layer in layers
                    ]
                    rows.append(
                        {
                            "length": length,
                            "depth": depth,
                            "variant": variant,
                            "budget": b,
                            **summarize(per_layer),
                        }
                    )
            print(f"L{length} d{depth} done", flush=True)
    return {"config": {"lengths": lengths, "depths": depths, "window": window}, "rows": rows}


def table(result: dict) -> str:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["variant"], r["budget"]), []).append(r)
    keys = (
        "answer_error",
        "needle_kept",
        "retrieval_heads",
        "retrieval_kept",
        "retrieval_mass_ratio",
        "foreign_share",
    )
    out = [
        "| variant | budget | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for (variant, budget), rows in groups.items():
        cells = [f"{sum(r[k] for r in rows) / len(rows):.3f}" for k in keys]
        out.append(f"| {variant} | {budget:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument(
        "--variants", nargs="+", default=["keepkv", "keepkv-nomerge", "snapkv"], choices=list(VARIANTS)
    )
    p.add_argument("--out", type=Path, default=Path("results/needle-audit"))
    args = p.parse_args(argv)
    result = run(tuple(args.lengths), tuple(args.depths), tuple(args.budgets), tuple(args.variants))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "needle_audit.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (args.out / "needle_audit.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
