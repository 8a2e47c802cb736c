"""The paper's baselines and ablations as layouts of the CGC-LoRA layer (paper 5.2, 5.6, 5.7).

Every row of the paper's Tables III and V that trains adapters is a setting of the same layer:
N_c common experts of rank r_c, one expert of rank r_s per task, and a gate. The rows are
compared at the same trainable size, the total rank r = N_c r_c + M r_s of the CGC-LoRA layout
they stand beside (M tasks):

    row              N_c       r_c    r_s     gate        paper
    cgc_lora         N_c       r_c    r_s     as given    CGC-LoRA
    lora_full        1         r      0       uniform     LoRA Full: one LoRA on all tasks
    lora_single      0         0      r / M   uniform     LoRA Single: one LoRA per task
    moelora          r / r_c   r_c    0       as given    MOE-LoRA: gated common experts only
    no_gate          N_c       r_c    r_s     uniform     w/o gate
    per_layer_gates  N_c       r_c    r_s     per_layer   multiple gates

This module is the one definition: `CGCLoRAConfig.lora_full` / `.lora_single` / `.moe_lora` build
their layouts from it, configs/lora_full.py etc. apply it to configs/promptcblue.py, and
bench/paper_table.py to the table's config. It reads and returns plain fields (no JAX), so that
loading a config stays cheap.

    layout_at_total_rank("moelora", cfg.lora, num_tasks=8)   # N_c 8, r_c 2, r_s 2 (r = 32)
    # {"num_common": 16, "common_rank": 2, "specific_rank": 0}
    cfg = with_baseline(load_config("med8"), "lora_full")    # med8 with one rank-16 LoRA
"""

from __future__ import annotations

TITLES = {  # row -> its name in the paper's tables
    "cgc_lora": "CGC-LoRA",
    "lora_full": "LoRA Full",
    "lora_single": "LoRA Single",
    "moelora": "MOE-LoRA",
    "no_gate": "w/o gate",
    "per_layer_gates": "multiple gates",
}


def lora_full(rank: int) -> dict:
    """One LoRA of rank `rank` shared by all tasks, no gate."""
    return {"num_common": 1, "common_rank": rank, "specific_rank": 0, "gate": "uniform"}


def lora_single(rank: int) -> dict:
    """One LoRA of rank `rank` per task, nothing shared."""
    return {"num_common": 0, "common_rank": 0, "specific_rank": rank, "gate": "uniform"}


def moe_lora(num_experts: int, rank: int) -> dict:
    """`num_experts` common experts of rank `rank` mixed by the task gate, no specific experts."""
    return {"num_common": num_experts, "common_rank": rank, "specific_rank": 0}


def layout_at_total_rank(row: str, lora, num_tasks: int) -> dict:
    """The layout fields (a subset of num_common, common_rank, specific_rank, gate) that make the
    CGC-LoRA layout `lora` (a config's lora section or a CGCLoRAConfig) row `row` of the paper's
    tables at the same total rank, for `num_tasks` tasks; the other fields stay as they are."""
    if row not in TITLES:
        raise ValueError(f"unknown baseline {row!r}; choose from {', '.join(TITLES)}")
    if num_tasks < 1:
        raise ValueError(f"baseline {row!r} needs the task count (data.tasks is empty) for its total rank")
    rank = lora.num_common * lora.common_rank + num_tasks * lora.specific_rank
    if row == "lora_full":
        return lora_full(rank)
    if row == "lora_single":
        if rank % num_tasks:
            raise ValueError(f"total rank {rank} does not split into {num_tasks} equal per-task LoRAs")
        return lora_single(rank // num_tasks)
    if row == "moelora":
        if not lora.common_rank or rank % lora.common_rank:
            raise ValueError(f"total rank {rank} is not a whole number of rank-{lora.common_rank} experts")
        return moe_lora(rank // lora.common_rank, lora.common_rank)
    return {"cgc_lora": {}, "no_gate": {"gate": "uniform"}, "per_layer_gates": {"gate": "per_layer"}}[row]


def with_baseline(cfg, row: str):
    """`cfg` (a whole config: its data.tasks count the tasks) with its lora section made row `row`
    at the same total rank; changed in place and returned."""
    cfg.lora.update(layout_at_total_rank(row, cfg.lora, len(cfg.data.tasks)))
    return cfg
