"""Named configs, dotted overrides and their errors. Every named config is configs/base.py (the
schema) plus the fields it sets: pinned here, with the paper's numbers, for the paper's configs."""

import ast
import json

import pytest

from cgc_lora_jax.config import CONFIG_DIR, ConfigError, available_configs, load_config, to_json
from cgc_lora_jax.scoring import firefly, promptcblue

BASELINES = {"lora_full", "lora_single", "moelora", "no_gate", "per_layer_gates"}
PAPER_RECIPE = {  # the schema's values: the paper's base and method, MOELoRA's optimiser settings
    "model.path": "checkpoints/chatglm-6b", "model.dtype": "bfloat16", "lora.num_common": 8, "lora.common_rank": 2,
    "lora.specific_rank": 2, "lora.alpha": 32.0, "lora.gate": "shared", "lora.task_embed_dim": 64,
    "lora.dropout": 0.1, "lora.targets": "", "data.max_source_len": 1024, "data.max_target_len": 196,
    "train.batch_size": 64, "train.steps": 8000, "train.lr": 2e-4, "train.warmup_steps": 100,
    "eval.max_new_tokens": 196,
}
AS_ITS_FILE_SAYS = None  # configs whose values are tuned as the project goes: the fields its file assigns
OVERRIDES = {  # config: (the config it starts from, the fields it sets over it)
    "promptcblue": ("base", {"data.format": "promptcblue", "data.path": "data/PromptCBLUE",
                             "data.tasks": promptcblue.PAPER_TASKS}),
    "firefly": ("base", {"data.format": "firefly", "data.path": "data/firefly", "data.tasks": firefly.PAPER_TASKS,
                         "data.max_train_per_task": 1800, "data.max_eval_per_task": 300}),
    # the baselines at CGC-LoRA's total rank 8 * 2 + 8 * 2 = 32 (paper 5.2, 5.6, 5.7)
    "lora_full": ("promptcblue", {"lora.num_common": 1, "lora.common_rank": 32, "lora.specific_rank": 0,
                                  "lora.gate": "uniform"}),
    "lora_single": ("promptcblue", {"lora.num_common": 0, "lora.common_rank": 0, "lora.specific_rank": 4,
                                    "lora.gate": "uniform"}),
    "moelora": ("promptcblue", {"lora.num_common": 16, "lora.specific_rank": 0}),
    "no_gate": ("promptcblue", {"lora.gate": "uniform"}),
    "per_layer_gates": ("promptcblue", {"lora.gate": "per_layer"}),
    "demo": ("base", AS_ITS_FILE_SAYS),
    "demo_tiny": ("base", AS_ITS_FILE_SAYS),
    "med8": ("promptcblue", AS_ITS_FILE_SAYS),
    "med8_gpu": ("med8", AS_ITS_FILE_SAYS),
}


def flat(cfg) -> dict:
    return {f"{section}.{key}": value for section, fields in cfg.to_dict().items() for key, value in fields.items()}


def assigned_fields(path) -> dict[str, int]:
    """{"section.field": line} of every `c.section.field = ...` (or tuple of them) in a config file."""
    fields = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute):
                        fields[f"{t.value.attr}.{t.attr}"] = t.lineno
    return fields


def test_every_config_is_its_parent_plus_the_fields_it_sets():
    assert set(OVERRIDES) == set(available_configs()) - {"base"}, "a new config needs its expectation here"
    schema = flat(load_config("base"))
    assert {k: schema[k] for k in PAPER_RECIPE} == PAPER_RECIPE
    for name, (parent, sets) in OVERRIDES.items():
        got, start = flat(load_config(name)), flat(load_config(parent))
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in schema.items()}, name
        if sets is AS_ITS_FILE_SAYS:
            sets = {k: got[k] for k in assigned_fields(CONFIG_DIR / f"{name}.py")}
            assert sets, name
        assert got == {**start, **sets}, name


def test_the_schema_comments_every_field():
    path = CONFIG_DIR / "base.py"
    lines = path.read_text().splitlines()
    fields = assigned_fields(path)
    assert set(fields) == set(flat(load_config("base")))
    uncommented = [k for k, line in fields.items() if "  # " not in lines[line - 1]]
    assert not uncommented, f"{path}: fields without a comment: {uncommented}"


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
