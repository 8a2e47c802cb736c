"""cgc_lora_jax/baselines.py: each row of the paper's tables is the layout its name says (written
out here from the paper's definitions), at the total rank of the CGC-LoRA layout it stands beside;
the layer's constructors build the same layouts; a row that cannot have that rank is an error."""

import dataclasses

import pytest

from cgc_lora_jax.baselines import TITLES, layout_at_total_rank, with_baseline
from cgc_lora_jax.config import load_config
from cgc_lora_jax.layers import CGCLoRAConfig

CGC = CGCLoRAConfig(num_tasks=6, num_common=3, common_rank=2, specific_rank=1, alpha=12.0, task_embed_dim=8)
RANK = 3 * 2 + 6 * 1


@pytest.mark.parametrize("row, layout", [
    ("cgc_lora", dict(num_common=3, common_rank=2, specific_rank=1, gate="shared")),
    ("lora_full", dict(num_common=1, common_rank=RANK, specific_rank=0, gate="uniform")),
    ("lora_single", dict(num_common=0, common_rank=0, specific_rank=RANK // 6, gate="uniform")),
    ("moelora", dict(num_common=RANK // 2, common_rank=2, specific_rank=0, gate="shared")),
    ("no_gate", dict(num_common=3, common_rank=2, specific_rank=1, gate="uniform")),
    ("per_layer_gates", dict(num_common=3, common_rank=2, specific_rank=1, gate="per_layer")),
])
def test_each_row_is_its_layout_at_the_same_total_rank(row, layout):
    made = dataclasses.replace(CGC, **layout_at_total_rank(row, CGC, CGC.num_tasks))
    assert made == dataclasses.replace(CGC, **layout)  # alpha, d_e, dropout, targets stay
    assert made.total_rank == CGC.total_rank == 12


def test_the_layer_constructors_build_the_same_layouts():
    made = lambda row: dataclasses.replace(CGC, **layout_at_total_rank(row, CGC, 6))
    keep = dict(alpha=12.0, task_embed_dim=8)
    assert CGCLoRAConfig.lora_full(6, 12, **keep) == made("lora_full")
    assert CGCLoRAConfig.lora_single(6, 2, **keep) == made("lora_single")
    assert CGCLoRAConfig.moe_lora(6, 6, 2, **keep) == made("moelora")


def test_with_baseline_changes_only_the_layout_of_a_config():
    med8 = load_config("med8")
    made = with_baseline(load_config("med8"), "lora_single")
    assert (made.lora.num_common, made.lora.specific_rank, made.lora.gate) == (0, 2, "uniform")
    changed = {(s, k) for s in med8 for k in med8[s] if med8[s][k] != made[s][k]}
    assert changed <= {("lora", "num_common"), ("lora", "common_rank"), ("lora", "specific_rank"), ("lora", "gate")}


def test_rows_that_cannot_have_the_total_rank_are_errors():
    with pytest.raises(ValueError, match="does not split into 5"):
        layout_at_total_rank("lora_single", CGC, 5)  # 3 * 2 + 5 = 11 over 5 tasks
    with pytest.raises(ValueError, match="not a whole number of rank-4 experts"):
        layout_at_total_rank("moelora", dataclasses.replace(CGC, common_rank=4), 6)  # 3 * 4 + 6 = 18
    with pytest.raises(ValueError, match="data.tasks is empty"):
        with_baseline(load_config("demo_tiny"), "lora_full")
    with pytest.raises(ValueError, match="choose from " + ", ".join(TITLES)):
        layout_at_total_rank("lora_half", CGC, 6)
