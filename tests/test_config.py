import pytest

from fastmmoe_compile import ConfigError, FastMMoEConfig
from fastmmoe_compile.algorithm import stage_ratios, vision_topk


@pytest.mark.parametrize("kwargs,message", [
    ({"vision_expert_ratio": 0.0}, "vision_expert_ratio"),
    ({"vision_expert_ratio": 1.2}, "vision_expert_ratio"),
    ({"vision_topk": 0}, "Kv"),
    ({"reduce_from_layer": -1}, "reduce_from_layer"),
    ({"merge_layers": (8, 5)}, "strictly increasing"),
    ({"merge_layers": "5,x"}, "list of integers"),
    ({"keep_ratio": 0.0}, "keep_ratio"),
    ({"merge_layers": (5, 8), "stage_ratios": (0.9,)}, "stage_ratios has 1 entries for 2"),
    ({"window": 1}, "window"),
    ({"alpha": 2.0}, "alpha"),
    ({"strategy": "random"}, "strategy"),
    ({"merge_method": "max"}, "merge_method"),
])
def test_bad_values_are_refused_on_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FastMMoEConfig(**kwargs)


def test_kv_follows_the_spec():
    assert FastMMoEConfig(vision_expert_ratio=0.5).kv(8) == 4
    assert FastMMoEConfig(vision_expert_ratio=0.5).kv(6) == 3
    assert FastMMoEConfig(vision_expert_ratio=0.3).kv(6) == 1  # floor(1.8)
    assert FastMMoEConfig(vision_expert_ratio=0.1).kv(4) == 1  # max(1, 0)
    assert FastMMoEConfig(vision_expert_ratio=0.5, vision_topk=3).kv(8) == 3
    assert vision_topk(8, 1.0) == 8


def test_model_checks():
    FastMMoEConfig(reduce_from_layer=47, merge_layers=(5, 8, 12)).check_model(48, 8)
    with pytest.raises(ConfigError, match="out of range"):
        FastMMoEConfig(reduce_from_layer=48).check_model(48, 8)
    with pytest.raises(ConfigError, match=r"merge_layers \[48\] out of range"):
        FastMMoEConfig(merge_layers=(5, 48)).check_model(48, 8)


def test_dict_roundtrip_and_list_parsing():
    c = FastMMoEConfig(merge_layers="5,8,12", keep_ratio=0.5)
    assert c.merge_layers == (5, 8, 12)
    assert FastMMoEConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown"):
        FastMMoEConfig.from_dict({"bogus": 1})


def test_stage_ratios_compound_to_keep_ratio():
    rs = stage_ratios(0.75, 3)
    assert abs(rs[0] - 0.9086) < 1e-3 and abs(rs[0] ** 3 - 0.75) < 1e-12
    assert stage_ratios(0.5, 2, (0.8, 0.625)) == [0.8, 0.625]
