"""ModelConfig: the layer-pattern grammar, validation with one clear sentence, JSON round trip."""

from __future__ import annotations

import json

import pytest

from effarch import ModelConfig, build_model
from effarch.models.config import parse_pattern


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("a", ["a"]),
        ("a*3", ["a", "a", "a"]),
        ("(a b)*3 c", ["a", "b"] * 3 + ["c"]),
        ("(a (b c)*2)*2", ["a", "b", "c", "b", "c"] * 2),
        ("a b*2 (c)", ["a", "b", "b", "c"]),
    ],
)
def test_pattern_grammar(pattern, expected):
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("bad", ["", "(a b", "a b)", "*2", "()", "a*0", "a, b", "(a)*x"])
def test_bad_patterns_fail_with_the_field_named(bad):
    with pytest.raises(ValueError, match="layers="):
        ModelConfig(layers=bad)


def test_unknown_mixer_lists_registered_ones():
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'.*attn"):
        ModelConfig(layers="attn nope")


def test_impossible_dimensions_name_the_field():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=100, mixers={"attn": {"n_heads": 3}})
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(d_model=64, mixers={"attn": {"n_heads": 4, "n_kv_heads": 3}})
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(d_model=0)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=-5)


def test_unknown_option_and_ffn():
    with pytest.raises(ValueError, match="no option 'heads'"):
        ModelConfig(mixers={"attn": {"heads": 4}})
    with pytest.raises(ValueError, match="ffn 'moe9'"):
        ModelConfig(ffn="moe9")
    with pytest.raises(ValueError, match="ffn_layers"):
        ModelConfig(layers="attn*2", ffn_layers="swiglu")


def test_variants_by_name_build_distinct_layers():
    cfg = ModelConfig(
        d_model=64,
        layers="(swa attn)*2",
        mixers={"swa": {"type": "attn", "window": 8, "n_heads": 4}, "attn": {"n_heads": 2}},
        ffn_layers="(swiglu none)*2",
    )
    m = build_model(cfg)
    assert [b.mixer.window for b in m.blocks] == [8, None, 8, None]
    assert [b.mixer.n_heads for b in m.blocks] == [4, 2, 4, 2]
    assert [b.ffn is None for b in m.blocks] == [False, True, False, True]


def test_json_round_trip(tmp_path):
    cfg = ModelConfig(d_model=64, layers="(attn)*3", mixers={"attn": {"n_heads": 4, "n_kv_heads": 1}}, name="x")
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_bad_json_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "field.json").write_text(json.dumps({"d_modle": 4}))
    with pytest.raises(ValueError, match="unknown field 'd_modle'"):
        ModelConfig.from_json(tmp_path / "field.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="UTF-8"):
        ModelConfig.from_json(tmp_path / "bin.json")
