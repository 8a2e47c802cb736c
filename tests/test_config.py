"""Named configs, dotted overrides and their errors."""

import json

import pytest

from cgc_lora_jax.config import ConfigError, available_configs, load_config, to_json

BASELINES = {"lora_full", "lora_single", "moelora", "no_gate", "per_layer_gates"}


def test_named_configs_exist_and_baselines_keep_the_total_rank():
    assert {"promptcblue", "firefly", "demo", "demo_tiny", "med8"} | BASELINES <= set(available_configs())
    paper = load_config("promptcblue")
    total = lambda c: c.lora.num_common * c.lora.common_rank + len(c.data.tasks) * c.lora.specific_rank
    assert (paper.lora.num_common, paper.lora.common_rank, paper.lora.gate) == (8, 2, "shared")
    assert (paper.train.batch_size, paper.train.steps, paper.train.lr) == (64, 8000, 2e-4)
    for name in BASELINES:
        assert total(load_config(name)) == total(paper) == 32, name
    assert load_config("no_gate").lora.gate == "uniform"
    assert load_config("per_layer_gates").lora.gate == "per_layer"
    firefly = load_config("firefly")
    assert (firefly.data.max_train_per_task, firefly.data.max_eval_per_task) == (1800, 300)


def test_overrides_are_parsed_to_the_field_type():
    c = load_config("promptcblue", ["--config.lora.num_common=4", "train.lr=1e-3", "model.remat=true",
                                    "data.tasks=CMeIE,CHIP-CTC", "model.builtin=tiny-chatglm"])
    assert c.lora.num_common == 4 and c.train.lr == 1e-3 and c.model.remat is True
    assert c.data.tasks == ("CMeIE", "CHIP-CTC") and c.model.builtin == "tiny-chatglm"
    assert json.loads(to_json(c))["lora"]["num_common"] == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.num_comon=4", "did you mean lora.num_common"),
        ("train.steps=ten", "expected an int"),
        ("model.remat=maybe", "expected a bool"),
        ("train.lr", "not KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("promptcblue", [override])


def test_unknown_config_name_suggests():
    with pytest.raises(ConfigError, match="did you mean promptcblue"):
        load_config("promptcblu")
