"""The shared test matrix: every registered method must pass every test here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_inputs

from keepkv_vllm.methods import METHODS, KVCompressionMethod, get_method

ALL = sorted(METHODS)
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def test_method_names_come_from_the_registry_alone():
    from keepkv_vllm.config import METHOD_NAMES, parse_config
    from keepkv_vllm.eval.harness import METHODS as EVALUATED

    assert {"keepkv", "kvmerger", "cam", "h2o", "snapkv", "streamingllm"} <= set(ALL)
    assert METHOD_NAMES == ("none", *ALL) and EVALUATED == METHOD_NAMES
    for name in ALL:  # the settings, the CLI's choices and keepkv-eval take every registered name
        assert parse_config({"method": name}).method == name


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("votes", ["ones", "merged"])
def test_budget_shapes_dtypes_and_accounting(name, dtype, group, votes):
    keys, values, vts, queries = make_inputs(h_kv=3, group=group, t=120, dtype=dtype, votes=votes)
    budget = 40
    res = get_method(name).compress(keys, values, vts, queries, budget)
    assert res.keys.shape == (3, budget, 16) and res.values.shape == (3, budget, 16)
    assert res.votes.shape == (3, budget) and res.kept_index.shape == (3, budget)
    assert res.keys.dtype == dtype and res.values.dtype == dtype and res.votes.dtype == vts.dtype
    # kept indices: strictly ascending, in range → survivors keep their order
    assert (res.kept_index.diff(dim=1) > 0).all()
    assert res.kept_index.min() >= 0 and res.kept_index.max() < 120
    assert torch.equal(res.num_merged + res.num_dropped, torch.full((3,), 120 - budget))
    assert torch.isfinite(res.keys.float()).all() and torch.isfinite(res.values.float()).all()
    assert (res.votes > 0).all() and torch.isfinite(res.votes).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sinks_and_recent_survive_bit_for_bit(name, dtype):
    keys, values, vts, queries = make_inputs(t=100, dtype=dtype, votes="merged", window=8)
    method = get_method(name, sink=3, recent=10)
    res = method.compress(keys, values, vts, queries, 30)
    for out, src in ((res.keys, keys), (res.values, values), (res.votes, vts)):
        assert torch.equal(out[:, :3], src[:, :3])
        assert torch.equal(out[:, -10:], src[:, -10:])
    assert torch.equal(res.kept_index[:, :3], torch.arange(3).expand(2, -1))
    assert torch.equal(res.kept_index[:, -10:], torch.arange(90, 100).expand(2, -1))


@pytest.mark.parametrize("name", ALL)
def test_auto_recent_covers_the_window(name):
    keys, values, vts, queries = make_inputs(t=100, window=12)
    method = get_method(name, sink=2)  # recent = max(ceil(0.1 * 30), W=12) = 12
    assert method.protected_span(30, 12).recent == 12
    res = method.compress(keys, values, vts, queries, 30)
    assert torch.equal(res.keys[:, -12:], keys[:, -12:])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("t", [20, 30])
def test_noop_when_under_budget(name, t):
    keys, values, vts, queries = make_inputs(t=t, window=4)
    res = get_method(name).compress(keys, values, vts, queries, 30)
    assert torch.equal(res.keys, keys) and torch.equal(res.values, values) and torch.equal(res.votes, vts)
    assert res.num_merged.sum() == 0 and res.num_dropped.sum() == 0


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name):
    keys, values, vts, queries = make_inputs(t=150, votes="merged")
    a = get_method(name).compress(keys, values, vts, queries, 50)
    b = get_method(name).compress(keys.clone(), values.clone(), vts.clone(), queries.clone(), 50)
    for x, y in ((a.keys, b.keys), (a.values, b.values), (a.votes, b.votes), (a.kept_index, b.kept_index)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ALL)
def test_heads_choose_independently(name):
    """Compressing heads one at a time equals compressing them together (no cross-head leak)."""
    keys, values, vts, queries = make_inputs(h_kv=3, group=2, t=90, votes="merged", dtype=torch.float64)
    method = get_method(name)
    whole = method.compress(keys, values, vts, queries, 33)
    for h in range(3):
        one = method.compress(
            keys[h : h + 1], values[h : h + 1], vts[h : h + 1], queries[2 * h : 2 * h + 2], 33
        )
        assert torch.equal(one.kept_index[0], whole.kept_index[h])
        torch.testing.assert_close(one.keys[0], whole.keys[h], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one.values[0], whole.values[h], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one.votes[0], whole.votes[h], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_does_not_mutate_inputs(name):
    keys, values, vts, queries = make_inputs(t=90, votes="merged")
    copies = [x.clone() for x in (keys, values, vts, queries)]
    get_method(name).compress(keys, values, vts, queries, 30)
    for x, c in zip((keys, values, vts, queries), copies, strict=True):
        assert torch.equal(x, c)


@pytest.mark.parametrize("name", ALL)
def test_unmerged_survivors_are_copies(name):
    """A survivor with merged-count 0 must be its source slot, bit for bit."""
    keys, values, vts, queries = make_inputs(t=90, votes="merged")
    res = get_method(name).compress(keys, values, vts, queries, 30)
    src_k = keys.gather(1, res.kept_index.unsqueeze(-1).expand(-1, -1, 16))
    same = (res.keys == src_k).all(dim=-1)
    if type(get_method(name)).merge is KVCompressionMethod.merge:  # eviction only
        assert same.all()
    # the number of changed survivors can't exceed the number of merged slots
    assert ((~same).sum(dim=1) <= res.num_merged).all()


def _bad_calls():
    k, v, p, q = make_inputs(t=64, window=4)
    nan_k = k.clone()
    nan_k[0, 3, 1] = math.nan
    inf_v = v.clone()
    inf_v[1, 5, 0] = math.inf
    zero_p = p.clone()
    zero_p[0, 0] = 0
    return {
        "budget_below_protected": ((k, v, p, q, 8), "smaller than sink"),
        "budget_zero": ((k, v, p, q, 0), "budget"),
        "budget_float": ((k, v, p, q, 10.5), "budget"),
        "budget_bool": ((k, v, p, q, True), "budget"),
        "nan_keys": ((nan_k, v, p, q, 32), "NaN or inf"),
        "inf_values": ((k, inf_v, p, q, 32), "NaN or inf"),
        "zero_vote": ((k, v, zero_p, q, 32), "votes must be > 0"),
        "values_shape": ((k, v[:, :-1], p, q, 32), "values shape"),
        "votes_shape": ((k, v, p[:, :-1], q, 32), "votes must be"),
        "query_dim": ((k, v, p, q[..., :-1], 32), "queries must be"),
        "gqa_ratio": ((k, v, p, q[:3], 32), "multiple of kv heads"),
        "window_too_long": ((k[:, :3], v[:, :3], p[:, :3], q, 2), "window"),
        "int_keys": ((k.long(), v, p, q, 32), "floating"),
    }


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_arguments_raise_clear_value_error(name, case):
    args, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        get_method(name, sink=4, recent=8).compress(*args)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "opts", [{"sink": -1}, {"recent": -2}, {"recent_fraction": 1.5}, {"no_such_knob": 1}]
)
def test_bad_options_raise_value_error(name, opts):
    with pytest.raises(ValueError):
        get_method(name, **opts)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown KV compression method 'nope'"):
        get_method("nope")
