"""panther.policy: spec validation, the three policy spellings, overrides, the default policy's threshold."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from panther.policy import (
    MIN_DEFAULT_RANK,
    LayerInfo,
    SketchSpec,
    decide,
    default_policy,
    default_spec,
    resolve_policy,
    sketched_cost,
    with_overrides,
)


def linear_info(name, d_in, d_out, n=4, bias=True):
    return LayerInfo(name=name, kind="linear", shapes={"input": (n, d_in), "weight": (d_out, d_in)},
                     params=d_in * d_out + (d_out if bias else 0), flops=2 * n * d_in * d_out, has_bias=bias,
                     extra={"in_features": d_in, "out_features": d_out})


def conv_info(name, c_in, c_out, k=3, positions=64):
    return LayerInfo(name=name, kind="conv2d", params=c_out * c_in * k * k + c_out,
                     flops=2 * positions * c_out * c_in * k * k, has_bias=True,
                     extra={"in_channels": c_in, "out_channels": c_out, "kernel_size": (k, k), "groups": 1})


def attn_info(name, L, d=16, bh=8):
    return LayerInfo(name=name, kind="attention", params=0, flops=4 * bh * L * L * d,
                     extra={"batch_heads": bh, "len_q": L, "len_k": L, "head_dim": d, "head_dim_v": d})


SPEC = SketchSpec(num_terms=1, low_rank=4)


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"low_rank": 0}, ValueError, "low_rank"),
        ({"num_terms": 1.5}, TypeError, "num_terms"),
        ({"num_random_features": True}, TypeError, "num_random_features"),
        ({"init": "qr"}, ValueError, "'sketch', 'svd'"),
        ({"kernel_fn": "tanh"}, ValueError, "kernel_fn"),
        ({"seed": "1"}, TypeError, "seed"),
    ],
)
def test_sketchspec_validation(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        SketchSpec(**kwargs)


def test_dict_policy_exact_name_wins_then_last_glob():
    pol = {
        "linear": SKETCH_A,
        "blocks.*": SKETCH_B,
        "blocks.1.fc": "skip",
        "head": "default",
    }
    d = resolve_policy(pol)
    assert d(linear_info("stem", 64, 64)) == (SKETCH_A, None)  # kind match only
    assert d(linear_info("blocks.0.fc", 64, 64)) == (SKETCH_B, None)  # later glob overrides the kind entry
    spec, reason = d(linear_info("blocks.1.fc", 64, 64))
    assert spec is None and "skip" in reason and "blocks.1.fc" in reason
    spec, _ = d(linear_info("head", 64, 64))
    assert spec == default_spec(linear_info("head", 64, 64))
    assert d(conv_info("conv", 8, 8))[0] is None  # no entry matches a conv


SKETCH_A = SketchSpec(num_terms=1, low_rank=4)
SKETCH_B = SketchSpec(num_terms=2, low_rank=2, init="svd")


def test_exact_name_beats_later_glob():
    d = resolve_policy({"fc": SKETCH_A, "*": "skip"})
    assert d(linear_info("fc", 8, 8)) == (SKETCH_A, None)
    assert d(linear_info("fc2", 8, 8))[0] is None


def test_callable_policy_and_bad_return():
    d = resolve_policy(lambda info: SKETCH_A if info.params > 100 else None)
    assert d(linear_info("big", 32, 32))[0] == SKETCH_A
    spec, reason = d(linear_info("small", 4, 4))
    assert spec is None and "None" in reason
    with pytest.raises(TypeError, match="SketchSpec"):
        resolve_policy(lambda info: 3)(linear_info("x", 4, 4))


def test_callable_policy_delegating_to_the_default_keeps_its_reasons():
    """A custom policy that hands some layers to default_policy reports the default's reason, not a bare None."""
    d = resolve_policy(lambda info: SKETCH_A if info.kind == "attention" else default_policy(info))
    assert "too small" in d(linear_info("tiny", 8, 8))[1]
    assert d(linear_info("fc", 64, 64))[0] is not None
    # a None the policy chose itself, after the default accepted this layer (or judged another), stays bare
    picky = resolve_policy(lambda info: default_policy(info) and None)
    assert picky(linear_info("fc", 64, 64))[1] == "policy returned None"
    default_policy(linear_info("tiny", 8, 8))
    assert resolve_policy(lambda info: None)(linear_info("other", 8, 8))[1] == "policy returned None"


@pytest.mark.parametrize("bad", [3, "all", [SKETCH_A]])
def test_bad_policy_types(bad):
    with pytest.raises(TypeError, match="policy"):
        resolve_policy(bad)


@pytest.mark.parametrize("table, exc", [({"fc": 3}, TypeError), ({1: SKETCH_A}, TypeError), ({"fc": "sometimes"}, TypeError)])
def test_bad_dict_entries(table, exc):
    with pytest.raises(exc, match="policy"):
        resolve_policy(table)


def test_dict_values_may_be_plain_dicts_of_spec_fields():
    d = with_overrides({"linear": {"num_terms": 1, "low_rank": 4}}, {"head": {"num_terms": 2, "low_rank": 2, "init": "svd"}})
    assert d(linear_info("body", 64, 64)) == (SKETCH_A, None)
    assert d(linear_info("head", 64, 64)) == (SKETCH_B, None)
    with pytest.raises(TypeError, match=r"policy\['fc'\] has unknown SketchSpec field\(s\) \['rank'\]; allowed: .*low_rank"):
        resolve_policy({"fc": {"rank": 4}})
    with pytest.raises(ValueError, match="low_rank"):  # the fields are validated as in SketchSpec
        resolve_policy({"fc": {"low_rank": 0}})


def test_overrides_consulted_first():
    d = with_overrides(lambda info: SKETCH_A, {"head": "skip", "conv*": SKETCH_B})
    assert decide(d, linear_info("head", 64, 64))[0] is None
    assert decide(d, linear_info("body", 64, 64))[0] == SKETCH_A.replace(init="sketch")
    assert decide(d, conv_info("conv1", 8, 8))[0] == SKETCH_B


def test_decide_fills_missing_fields():
    info = linear_info("fc", 128, 128)
    spec, _ = decide({"fc": SketchSpec(init="svd")}, info)
    assert (spec.num_terms, spec.low_rank, spec.init) == (1, default_spec(info).low_rank, "svd")
    spec, _ = decide({"*": SketchSpec(kernel_fn="relu")}, attn_info("a", 64))
    assert spec.num_random_features == 4 * 16 and spec.kernel_fn == "relu"


def test_default_features_stay_within_the_fused_kernels():
    """4·head_dim features, capped where panther's fused GPU attention kernels stop (head_dim 128 would ask
    for 512, which only the slow ATen path serves)."""
    from panther.policy import DEFAULT_MAX_FEATURES

    triton_attention = pytest.importorskip("inductor_ext.triton_attention")
    assert DEFAULT_MAX_FEATURES == triton_attention.MAX_FEATURES
    assert default_spec(attn_info("a", 64, d=32)).num_random_features == 128
    assert default_spec(attn_info("a", 64, d=128)).num_random_features == DEFAULT_MAX_FEATURES


def test_init_left_none_follows_the_caller():
    # convert trains its layers (the library's random init); the compile backend only serves inference (SVD)
    info = linear_info("fc", 128, 128)
    assert decide({"fc": SketchSpec(low_rank=4)}, info)[0].init == "sketch"
    assert decide({"fc": SketchSpec(low_rank=4)}, info, default_init="svd")[0].init == "svd"
    assert decide({"fc": SketchSpec(low_rank=4, init="sketch")}, info, default_init="svd")[0].init == "sketch"
    with pytest.raises(ValueError, match="init"):
        SketchSpec(init="random")


def test_default_policy_threshold():
    # 64x64: the FLOP-halving rank is 64*64/(4*128) = 8 = MIN_DEFAULT_RANK -> rewritten at exactly half.
    info = linear_info("fc", 64, 64)
    spec = default_policy(info)
    assert spec is not None and spec.low_rank == 8 and spec.init == "svd"
    assert 2 * sketched_cost(info, spec)[1] == info.flops
    # 32x32: halving needs rank <= 4 < 8 -> left dense.
    assert default_policy(linear_info("fc", 32, 32)) is None
    # Attention: random features pay off only for long sequences.
    assert default_policy(attn_info("a", 32)) is None
    long = attn_info("a", 1024)
    spec = default_policy(long)
    assert spec is not None and 2 * sketched_cost(long, spec)[1] <= long.flops
    spec, reason = decide(None, linear_info("tiny", 8, 8))
    assert spec is None and "too small" in reason
    spec, reason = decide(None, attn_info("a", 32))
    assert spec is None and "would not halve" in reason


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2048), st.integers(1, 2048), st.integers(1, 64))
def test_default_policy_only_accepts_halving(d_in, d_out, n):
    info = linear_info("fc", d_in, d_out, n=n)
    spec = default_policy(info)
    if spec is None:
        assert (d_in * d_out) // (4 * (d_in + d_out)) < MIN_DEFAULT_RANK
    else:
        assert 2 * sketched_cost(info, spec)[1] <= info.flops


def test_cost_model_formulas():
    info = linear_info("fc", 96, 40, n=7)
    spec = SketchSpec(num_terms=3, low_rank=5)
    params, flops = sketched_cost(info, spec)
    assert params == 2 * 3 * 5 * (96 + 40) + 40
    assert flops == 4 * 7 * 3 * 5 * (96 + 40)
    cinfo = conv_info("c", 6, 10, k=3, positions=50)
    params, flops = sketched_cost(cinfo, spec)
    assert params == 2 * 3 * 5 * 6 * 9 + 2 * 3 * 5 * 10 + 10
    assert flops == 2 * 50 * (2 * 3 * 5) * (6 * 9) + 2 * 50 * (2 * 3 * 5) * 10
    ainfo = attn_info("a", 10, d=4, bh=3)
    params, flops = sketched_cost(ainfo, SketchSpec(num_random_features=6))
    assert params == 6 * 4
    assert flops == 2 * 3 * 20 * 4 * 6 + 2 * 3 * 10 * 6 * 5 * 2


def test_layerinfo_is_plain_data():
    info = linear_info("fc", 4, 4)
    assert dataclasses.replace(info, name="g").name == "g"
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "h"


def test_spec_sizes_take_any_integer_type_and_keep_a_plain_int():
    np = pytest.importorskip("numpy")
    spec = SketchSpec(num_terms=np.int32(2), low_rank=np.int64(16), num_random_features=torch.tensor(8).item())
    assert spec == SketchSpec(num_terms=2, low_rank=16, num_random_features=8)
    assert type(spec.low_rank) is int and type(spec.num_terms) is int
    for bad in (16.0, True, "16", np.float64(16)):
        with pytest.raises(TypeError, match="low_rank must be a positive int"):
            SketchSpec(low_rank=bad)
    with pytest.raises(ValueError, match="low_rank must be a positive int"):
        SketchSpec(low_rank=np.int64(0))
