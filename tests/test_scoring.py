"""Tests for cgc_lora_jax/scoring: the official PromptCBLUE scorer and the Firefly scorer.

Expected numbers come from /work/shared/data/promptcblue/SCORING.md (its section 3 table) or are
computed by hand in the comments. Rouge-L values use F = 2 * (P * R / (P + R + 1e-8)).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgc_lora_jax.scoring import ScoringError, firefly, promptcblue, score_files, score_records
from cgc_lora_jax.scoring.metrics import chinese_tokens, lcs_length
from conftest import SHARED

PROMPTCBLUE_DATA = SHARED / "data" / "promptcblue"
needs_shared = pytest.mark.skipif(not (PROMPTCBLUE_DATA / "dev.json").exists(),
                                  reason=f"shared PromptCBLUE samples not found under {SHARED}")

CDEE_HEADER = "上述句子中的临床发现事件如下："
MDCFNPC_HEADER = "上述对话中临床发现实体以及其阴阳性判别如下："
MRG_HEADER = "上述问诊对话的诊疗报告如下："
MDCFNPC_CHOICES = ["已有症状疾病或者假设未来可能发生的疾病等", "未患有症状疾病",
                   "没有回答、不知道、回答不明确或者模棱两可不好推断",
                   "无实际意义的不标注或者和病人当前的状态独立不标注"]
ROUGE_IDENTICAL = 2 * (1 / (2 + 1e-8))  # P = R = 1: 0.999999995
MRG_GOLD = (f"{MRG_HEADER}\n主诉：咳嗽。\n现病史：咳嗽三天。\n辅助检查：无。\n既往史：体健。\n"
            "诊断：感冒。\n建议：多喝水。")


def rouge_f(lcs: int, n_pred: int, n_gold: int) -> float:
    precision, recall = lcs / n_pred, lcs / n_gold
    return 2 * ((precision * recall) / (precision + recall + 1e-8))


def score_one(task, golds, preds, choices=None, benchmark="promptcblue"):
    """Score one task given gold and predicted targets (and per-sample answer_choices)."""
    choices = choices if choices is not None else [None] * len(golds)
    gold = [{"sample_id": f"s{i}", "task_dataset": task, "target": g, "answer_choices": c}
            for i, (g, c) in enumerate(zip(golds, choices, strict=True))]
    pred = [{"sample_id": f"s{i}", "target": p} for i, p in enumerate(preds)]
    scores = score_records(pred, gold, benchmark)
    assert set(scores) == {scores_key(task, benchmark), "average"}
    return scores[scores_key(task, benchmark)]


def scores_key(task, benchmark):
    return promptcblue.canonical_task(task) if benchmark == "promptcblue" else task


# ---- gold answers as predictions ------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("split", ["train", "dev"])
def test_gold_as_prediction_gives_official_maximum(split):
    path = PROMPTCBLUE_DATA / f"{split}.json"
    scores = score_files(path, path)
    assert set(scores) == set(promptcblue.TASK_NAMES) | {"average"}
    for task in promptcblue.TASK_NAMES:
        # Every F1 task of the samples has at least one gold item, so TP > 0 and F1 = 1; the
        # Rouge-L tasks stop at 0.999999995 because of the 1e-8 in the denominator.
        expected = ROUGE_IDENTICAL if task in ("MedDG", "IMCS-V2-MRG") else 1.0
        assert scores[task] == pytest.approx(expected, abs=1e-12), task
    assert scores["average"] == pytest.approx((14 + 2 * ROUGE_IDENTICAL) / 16, abs=1e-12)


@needs_shared
def test_paper_tasks_subset_and_cmeie_v2_alias():
    records = [json.loads(line) for line in (PROMPTCBLUE_DATA / "dev.json").open(encoding="utf-8")]
    records = [r for r in records if r["task_dataset"] in promptcblue.PAPER_TASKS]
    for r in records:
        if r["task_dataset"] == "CMeIE":
            r["task_dataset"] = "CMeIE-V2"  # the 18-task name is reported as CMeIE
    scores = score_records(records, records)
    assert list(scores) == [t for t in promptcblue.TASK_NAMES if t in promptcblue.PAPER_TASKS] + [
        "average"]
    assert scores["average"] == pytest.approx((6 + 2 * ROUGE_IDENTICAL) / 8, abs=1e-12)


# ---- SCORING.md section 3 worked examples ---------------------------------------------------

CDEE_EVENT = "主体词：疼痛；发生状态：；描述词：；解剖部位：腹"
CMEIE_GOLD = "具有药物治疗关系的头尾实体对如下：头实体为A，尾实体为B。"
WORKED_EXAMPLES = [
    ("KUAKE-QIC", ["非上述类型", "治疗方案"], ["非上述类型", ""], None, 0.333333333),
    ("KUAKE-QIC", ["就医建议", "治疗方案", "治疗方案"], ["就医建议", "治疗方案", "xyz"], None,
     0.555555556),
    ("CHIP-CTC", ["体征(医生检测）", "疾病"], ["体征(医生检测)", "疾病"], None, 0.333333333),
    ("CHIP-MDCFNPC",
     [f"{MDCFNPC_HEADER}\n咳嗽：无实际意义的不标注或者和病人当前的状态独立不标注\n发热：未患有症状疾病"],
     [f"{MDCFNPC_HEADER}\n咳嗽：已有症状疾病或者假设未来可能发生的疾病等 \n发热：未患有症状疾病 "],
     [MDCFNPC_CHOICES], 0.5),
    ("CHIP-MDCFNPC", [f"{MDCFNPC_HEADER}\n咳嗽：未患有症状疾病\n发热：未患有症状疾病"],
     ["咳嗽：未患有症状疾病\n发热：未患有症状疾病"], [MDCFNPC_CHOICES], 0.666666667),
    ("CHIP-CDEE", [f"{CDEE_HEADER}\n{CDEE_EVENT}"], [f"{CDEE_HEADER}\n{CDEE_EVENT}\n\n"], None,
     0.666666667),
    ("CHIP-CDEE", [f"{CDEE_HEADER}\n主体词：x；描述词：a，b"], [f"{CDEE_HEADER}\n主体词：x；描述词：b，a"],
     None, 0.0),
    ("CHIP-CDN", ["a，b"], ["a，b\n说明"], [["a", "b"]], 0.0),
    ("CHIP-CDN", ["a，b"], [",".join(["a"] * 101) + ",b"], [["a", "b"]], 0.666666667),
    ("CHIP-CDN", ["a，b"], ["a，a，c，b"], [["a", "b"]], 1.0),
    ("CMeIE", [CMEIE_GOLD], [CMEIE_GOLD.replace("，", ",")], None, 1.0),
    ("CMeIE", [CMEIE_GOLD], [CMEIE_GOLD[2:]], None, 0.0),
    ("CMeIE", [CMEIE_GOLD], [CMEIE_GOLD + "头实体为A，尾实体为B。头实体为B，尾实体为A。"], None,
     0.666666667),
    ("IMCS-V2-MRG", [MRG_GOLD], [MRG_GOLD], None, 0.999999995),
    ("IMCS-V2-MRG", [MRG_GOLD], [MRG_GOLD.split("\n", 1)[1]], None, 0.899999995),
    ("IMCS-V2-MRG", [MRG_GOLD], [MRG_GOLD + "\n主诉：发烧。"], None, 0.888888884),
    ("MedDG", ["好的。"], ["\ufffd\x07"], None, 0.399999995),
    ("MedDG", ["take PPI 20mg"], ["take ppi 20 mg"], None, 0.571428567),
]


@pytest.mark.parametrize("task,golds,preds,choices,expected", WORKED_EXAMPLES)
def test_scoring_md_worked_examples(task, golds, preds, choices, expected):
    assert score_one(task, golds, preds, choices) == pytest.approx(expected, abs=1e-9)


def test_chinese_tokens_follow_basic_tokenizer():
    assert chinese_tokens("做个CT检查，20mg。") == ["做", "个", "ct", "检", "查", "，", "20mg", "。"]
    # Accents dropped (the kana voicing mark too: が is か + U+3099), kana kept whole, U+3000 is
    # a space, control / format characters deleted.
    assert chinese_tokens("Café\u3000ひらがな\u200b!\x07") == ["cafe", "ひらかな", "!"]
    assert chinese_tokens("\ufffd\x00\u200e") == []


# ---- hand-made imperfect predictions --------------------------------------------------------


def test_cmeie_micro_f1_by_hand():
    golds = ["具有临床表现关系的头尾实体对如下：头实体为GBS，尾实体为腱反射丧失。头实体为GBS，尾实体为"
             "远端腱反射丧失。\n具有发病率关系的头尾实体对如下：",
             "具有筛查关系的头尾实体对如下：头实体为铁缺乏，尾实体为红细胞内游离原卟啉。"]
    preds = ["具有临床表现关系的头尾实体对如下：头实体为 GBS ，尾实体为腱反射丧失。头实体为GBS，尾实体为肌无力。",
             ""]
    # s0: (GBS, 腱反射丧失) TP (spaces stripped), (GBS, 肌无力) FP, (GBS, 远端…) FN.
    # s1: empty output, 1 FN. TP=1 FP=1 FN=2: P=1/2, R=1/3, F1=2*(1/6)/(5/6)=0.4.
    assert score_one("CMeIE", golds, preds) == pytest.approx(0.4)


def test_cdn_micro_f1_by_hand():
    choices = [["肺恶性肿瘤", "腺癌", "肺部阴影"], ["不自主运动", "未特指的低血糖"], ["未特指的低血糖", "低血糖"]]
    golds = ["肺恶性肿瘤，腺癌", "不自主运动", "未特指的低血糖"]
    preds = ["腺癌\n肺恶性肿瘤，腺癌，肺部阴影", "不自主运动, 未特指的低血糖, 肺恶性肿瘤", "未特指的低血糖。"]
    # s0: last line only: TP=2 (肺恶性肿瘤, 腺癌), FP=1 (肺部阴影).
    # s1: ASCII commas normalised: TP=1, FP=1 (未特指的低血糖); 肺恶性肿瘤 is no candidate: dropped.
    # s2: "未特指的低血糖。" is no candidate, dropped: FN=1.
    # TP=3 FP=2 FN=1: P=3/5, R=3/4, F1=0.9/1.35=2/3.
    assert score_one("CHIP-CDN", golds, preds, choices) == pytest.approx(2 / 3)


def test_cdee_micro_f1_by_hand():
    golds = [f"{CDEE_HEADER}\n主体词：咳嗽；发生状态：；描述词：间断性；解剖部位：\n主体词：发热；发生状态：否定；"
             "描述词：；解剖部位：",
             f"{CDEE_HEADER}\n主体词：疼痛；发生状态：；描述词：；解剖部位：腹，背"]
    preds = [f"{CDEE_HEADER}\n解剖部位：；描述词：间断性；主体词：咳嗽\n主体词：发热；发生状态：不确定\n garbage",
             "主体词：疼痛；发生状态：；描述词：；解剖部位：腹，背"]
    # s0: reordered fields still give (咳嗽, "", [间断性], []) TP; (发热, 不确定) FP; the garbage
    #     line is an all-empty event, FP; gold (发热, 否定) FN.
    # s1: no header line, so its only event is dropped: FN.
    # TP=1 FP=2 FN=2: P=R=1/3, F1=1/3.
    assert score_one("CHIP-CDEE", golds, preds) == pytest.approx(1 / 3)


def test_mdcfnpc_micro_f1_by_hand():
    golds = [f"{MDCFNPC_HEADER}\n发热：未患有症状疾病\n咳嗽：已有症状疾病或者假设未来可能发生的疾病等",
             f"{MDCFNPC_HEADER}\n乏力：无实际意义的不标注或者和病人当前的状态独立不标注"]
    preds = [f"{MDCFNPC_HEADER}\n发热：未患有症状疾病\n咳嗽：已有症状疾病或者假设未来可能发生的疾病等。"
             "\n头痛：原因：不明",
             f"{MDCFNPC_HEADER}\n乏力：不标注"]
    # s0: 发热 TP; 咳嗽 label with "。" falls back to 无实际意义…: FP, and gold 咳嗽 FN; the 头痛
    #     line has two colons: skipped.  s1: 不标注 falls back to 无实际意义…, which is right: TP.
    # TP=2 FP=1 FN=1: P=R=2/3, F1=2/3.
    assert score_one("CHIP-MDCFNPC", golds, preds, [MDCFNPC_CHOICES] * 2) == pytest.approx(2 / 3)


def test_ner_micro_f1_by_hand():
    choices = [["疾病", "药物", "药物类别"]]
    golds = ["上述句子中的实体包含：\n疾病实体：肺结核，喉结核\n药物实体：\n药物类别实体：抗生素"]
    preds = ["上述句子中的实体包含：\n疾病实体：肺结核\n药物实体：异烟肼\n药物类别实体：抗生素，激素"]
    # Gold {肺结核/疾病, 喉结核/疾病, 抗生素/药物类别}; pred {肺结核/疾病, 异烟肼/药物,
    # 抗生素/药物类别, 激素/药物类别}. TP=2 FP=2 FN=1: P=1/2, R=2/3, F1=(2/3)/(7/6)=4/7.
    assert score_one("CMeEE-V2", golds, preds, choices) == pytest.approx(4 / 7)


def test_macro_f1_counts_each_distinct_wrong_string_as_a_class():
    # Labels {疾病, 疾病。, 药物, 答案：药物, 非上述类型}: F1 = 2/3 (疾病: P=1, R=1/2), 0, 0, 0, 1.
    golds, preds = ["疾病", "疾病", "药物", "非上述类型"], [" 疾病\n", "疾病。", "答案:药物", "非上述类型"]
    assert score_one("CHIP-CTC", golds, preds) == pytest.approx((2 / 3 + 1) / 5)
    # Three identical garbage outputs add one zero class: {病情诊断 0, xyz 0, 治疗方案 1} = 1/3;
    # three different ones add three: {病情诊断, x, y, z, 治疗方案} = 1/5.
    golds = ["病情诊断"] * 3 + ["治疗方案"]
    assert score_one("KUAKE-QIC", golds, ["xyz"] * 3 + ["治疗方案"]) == pytest.approx(1 / 3)
    assert score_one("KUAKE-QIC", golds, ["x", "y", "z", "治疗方案"]) == pytest.approx(1 / 5)


def test_weighted_f1_tasks_by_hand():
    # 相同 reads as 是的. 是的: P=1/1, R=1/2, F1=2/3 (support 2); 不是: P=1/2, R=1/2, F1=1/2
    # (support 2); xyz has support 0. Weighted: (2*2/3 + 2*1/2)/4 = 7/12.
    golds, preds = ["是的", "是的", "不是", "不是"], ["相同", "不是", "不是", "xyz"]
    assert score_one("CHIP-STS", golds, preds) == pytest.approx(7 / 12)
    # 相关: P=1/2, R=1, F1=2/3 (support 1); 不相关: F1=0 (support 2); "" weighs 0: (2/3)/3 = 2/9.
    assert score_one("KUAKE-IR", ["相关", "不相关", "不相关"], ["相关", "相关", ""]) == pytest.approx(2 / 9)


def test_meddg_rouge_by_hand():
    # s0: 多 喝 水 。 vs 多 喝 热 水: LCS 3 of 4 and 4 -> 0.749999995.
    # s1: empty output -> 无 。 vs 好 的 。: LCS 1, P=1/2, R=1/3 -> 0.399999995. Mean 0.574999995.
    expected = (rouge_f(3, 4, 4) + rouge_f(1, 2, 3)) / 2
    assert score_one("MedDG", ["多喝水。", "好的。"], ["多喝热水", ""]) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx(0.574999995, abs=1e-9)


def test_mrg_rouge_by_hand():
    pred = f"{MRG_HEADER}\n主诉：咳嗽。\n现病史：发热三天。\n 既往史：体健。\n【诊断】感冒。"
    # One pair per gold section; missing sections are "" -> placeholder 无 。:
    #   主诉 identical (0.999999995); 现病史 咳 嗽 三 天 。 vs 发 热 三 天 。 LCS 3/5/5 (0.599999995);
    #   辅助检查 gold 无 。 equals the placeholder (0.999999995); 既往史 (indented key not found)
    #   无 。 vs 体 健 。 LCS 1/2/3 (0.399999995); 诊断 (【】 key not found) the same;
    #   建议 无 。 vs 多 喝 水 。 LCS 1/2/4 (0.333333329). Mean 3.733333304/6 = 0.622222217.
    expected = (2 * ROUGE_IDENTICAL + rouge_f(3, 5, 5) + 2 * rouge_f(1, 2, 3)
                + rouge_f(1, 2, 4)) / 6
    assert score_one("IMCS-V2-MRG", [MRG_GOLD], [pred]) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx(0.622222217, abs=1e-9)


def test_average_is_unweighted_mean_over_tasks():
    gold = [{"sample_id": 1, "task_dataset": "KUAKE-QIC", "target": "治疗方案"},
            {"sample_id": 2, "task_dataset": "KUAKE-QIC", "target": "病因分析"},
            {"sample_id": 3, "task_dataset": "MedDG", "target": "好的。"}]
    pred = [{"sample_id": 3, "target": "好的。"}, {"sample_id": 2, "target": "病因分析"},
            {"sample_id": 1, "target": "治疗方案"}]  # order does not matter
    scores = score_records(pred, gold)
    assert scores == pytest.approx({"KUAKE-QIC": 1.0, "MedDG": ROUGE_IDENTICAL,
                                    "average": (1 + ROUGE_IDENTICAL) / 2}, abs=1e-15)


# ---- file errors ----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def record(sample_id, target="治疗方案", task="KUAKE-QIC"):
    return json.dumps({"sample_id": sample_id, "task_dataset": task, "target": target,
                       "answer_choices": None}, ensure_ascii=False)


@pytest.fixture
def gold_file(tmp_path):
    return write_lines(tmp_path / "gold.jsonl", [record("a"), record("b"), "", record("c")])


def test_files_score_and_write_out_path(tmp_path, gold_file):
    pred = write_lines(tmp_path / "pred.jsonl", [record("c"), record("a"), "   ", record("b")])
    scores = score_files(pred, gold_file, out_path=tmp_path / "out" / "scores.json")
    assert scores == {"KUAKE-QIC": 1.0, "average": 1.0}
    assert json.loads((tmp_path / "out" / "scores.json").read_text(encoding="utf-8")) == scores


@pytest.mark.parametrize("lines,message", [
    ([record("a"), record("b"), '{"sample_id": "c", "target": '],
     r"pred\.jsonl:3: malformed JSON line"),
    ([record("a"), record("a"), record("b"), record("c")],
     r"pred\.jsonl:2: duplicate sample_id 'a' \(first at .*pred\.jsonl:1\)"),
    ([record("a"), record("c")],
     r"pred\.jsonl: no prediction for 1 of 3 gold samples, the first being sample_id 'b' "
     r"\(.*gold\.jsonl:2\)"),
    ([record("a"), record("b"), record("c"), record("z")],
     r"pred\.jsonl:4: sample_id 'z' is not in the gold records"),
    ([record("a"), json.dumps({"sample_id": "b", "target": None}), record("c")],
     r"pred\.jsonl:2: `target` must be a string"),
    ([record("a"), json.dumps({"target": "x"})], r"pred\.jsonl:2: `sample_id` must be"),
    ([record("a"), "[1, 2]"], r"pred\.jsonl:2: expected a JSON object"),
])
def test_bad_prediction_files_name_file_and_line(tmp_path, gold_file, lines, message):
    pred = write_lines(tmp_path / "pred.jsonl", lines)
    with pytest.raises(ScoringError, match=message):
        score_files(pred, gold_file)


def test_bad_gold_and_arguments(tmp_path):
    gold = write_lines(tmp_path / "gold.jsonl", [record("a"), record("b", task="CBLUE-X")])
    with pytest.raises(ScoringError, match=r"gold\.jsonl:2: unknown promptcblue task 'CBLUE-X'"):
        score_files(gold, gold)
    with pytest.raises(ScoringError, match=r"predictions record 2: duplicate sample_id"):
        score_records([{"sample_id": 1, "target": ""}] * 2,
                      [{"sample_id": 1, "task_dataset": "MedDG", "target": ""}])
    with pytest.raises(ValueError, match="unknown benchmark"):
        score_records([], [], benchmark="cblue")


# ---- robustness: arbitrary model output ------------------------------------------------------

PROMPTCBLUE_GOLD = {
    "CMeEE-V2": ("上述句子中的实体包含：\n疾病实体：肺结核\n药物实体：", ["疾病", "药物"]),
    "CMeIE": (CMEIE_GOLD, ["药物治疗"]),
    "CHIP-CDN": ("肺恶性肿瘤，腺癌", ["肺恶性肿瘤", "腺癌", "肺部阴影"]),
    "CHIP-CDEE": (f"{CDEE_HEADER}\n{CDEE_EVENT}", None),
    "IMCS-V2-NER": ("上述句子中的实体包含：\n症状实体：低烧", ["症状"]),
    "CHIP-MDCFNPC": (f"{MDCFNPC_HEADER}\n咳嗽：未患有症状疾病", MDCFNPC_CHOICES),
    "IMCS-V2-SR": ("当前对话中的症状及其阴阳性判断为：\n发热：患有该症状",
                   ["没有患有该症状", "患有该症状", "无法根据上下文确定病人是否患有该症状"]),
    "IMCS-V2-DAC": ("关于症状的询问", ["关于症状的询问", "给出诊断"]),
    "CHIP-CTC": ("疾病", ["疾病", "药物"]),
    "CHIP-STS": ("是的", ["是的", "不是"]),
    "KUAKE-IR": ("相关", ["相关", "不相关"]),
    "KUAKE-QIC": ("治疗方案", ["治疗方案", "病因分析"]),
    "KUAKE-QQR": ("完全一致", ["完全一致", "语义无直接关联"]),
    "KUAKE-QTR": ("部分匹配", ["部分匹配", "完全匹配"]),
    "MedDG": ("多喝水，take PPI 20mg。", None),
    "IMCS-V2-MRG": (MRG_GOLD, None),
}
FIREFLY_GOLD = {
    "TextCorrection": "我今天很高兴。", "Summary": "苹果代工厂员工调查：为何争着“自愿”加班",
    "KeywordRecognition": "关键词：深度学习，神经网络", "MRC": "北京", "NER": "人名：张三\n地名：北京",
    "TextMatching": "相似", "NLI": "中立", "SentimentAnalyze": "积极",
}
_any_char = st.characters(exclude_categories=())  # every code point, lone surrogates included
model_text = st.one_of(
    st.just(""),
    st.text(_any_char, max_size=60),
    st.text(st.sampled_from(list("，,：:；;。\n\r\t 头实体为尾具有关系的如下主诉词a\u3000\ufffd")), max_size=80),
    st.text(_any_char, min_size=1, max_size=20).map(lambda s: s * (20_000 // len(s))),  # long
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(outputs=st.lists(model_text, min_size=24, max_size=24))
def test_any_output_scores_in_unit_interval(outputs):
    gold = [{"sample_id": task, "task_dataset": task, "target": target, "answer_choices": choices}
            for task, (target, choices) in PROMPTCBLUE_GOLD.items()]
    pred = [{"sample_id": r["sample_id"], "target": text} for r, text in zip(gold, outputs)]
    scores = score_records(pred, gold)
    assert set(scores) == set(PROMPTCBLUE_GOLD) | {"average"}
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    # Scoring the outputs as gold as well must not crash either.
    assert all(0.0 <= v <= 1.0 for v in score_records(pred, [dict(g, target=p["target"])
                                                            for g, p in zip(gold, pred)]).values())
    gold = [{"sample_id": t, "kind": t, "target": target} for t, target in FIREFLY_GOLD.items()]
    pred = [{"sample_id": r["sample_id"], "target": text} for r, text in zip(gold, outputs[16:])]
    assert all(0.0 <= v <= 1.0 for v in score_records(pred, gold, "firefly").values())


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(0, 4), max_size=40), b=st.lists(st.integers(0, 4), max_size=40))
def test_bit_parallel_lcs_matches_dynamic_programming(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (table[i][j] + 1 if x == y
                                   else max(table[i][j + 1], table[i + 1][j]))
    assert lcs_length(a, b) == lcs_length(b, a) == table[-1][-1]


# ---- Firefly --------------------------------------------------------------------------------


def test_firefly_gold_as_prediction():
    gold = [{"sample_id": i, "kind": task, "target": target}
            for i, (task, target) in enumerate(FIREFLY_GOLD.items())]
    scores = score_records(gold, gold, benchmark="firefly")
    assert list(scores) == list(firefly.TASK_NAMES) + ["average"]
    for task in firefly.TASK_NAMES:
        expected = ROUGE_IDENTICAL if task in firefly.ROUGE_TASKS else 1.0
        assert scores[task] == pytest.approx(expected, abs=1e-12), task


def test_firefly_metrics_by_hand():
    # 我 今 天 很 高 兴 。 vs 我 今 天 很 高 心 。: LCS 6 of 7 and 7 -> 0.857142852.
    assert score_one("TextCorrection", ["我今天很高兴。"], ["我今天很高心。"], benchmark="firefly") == (
        pytest.approx(rouge_f(6, 7, 7), abs=1e-15))
    # Summary: an empty output is the placeholder 无 。 against 加 班 。: LCS 1/2/3 -> 0.399999995.
    assert score_one("Summary", ["加班。"], [" "], benchmark="firefly") == pytest.approx(
        rouge_f(1, 2, 3), abs=1e-15)
    # s0 gold {人名/张三, 人名/李四, 地名/北京}, pred {人名/张三, 地名/北京, 地名/上海} (不存在实体 is
    # no item): TP=2 FP=1 FN=1. s1 "不存在实体" on both sides: no items. s2 pred ("", 上海) FP,
    # gold (地点, 上海) FN. TP=2 FP=2 FN=2: F1 = 1/2.
    golds = ["人名：张三，李四\n地名：北京", "不存在实体", "地点：上海"]
    preds = ["人名：张三\n地名：北京，上海\n组织：不存在实体", "不存在实体", "上海"]
    assert score_one("NER", golds, preds, benchmark="firefly") == pytest.approx(0.5)
    # Gold {深度学习, 图像识别, 神经网络}; pred {深度学习, 神经网络, 强化学习}: F1 = 2/3.
    assert score_one("KeywordRecognition", ["关键词：深度学习，图像识别、神经网络"],
                     ["深度学习, 神经网络; 强化学习"], benchmark="firefly") == pytest.approx(2 / 3)
    # MRC: " 北京 " strips to the gold span (TP); "1998" != "1998年" (FP + FN): F1 = 1/2.
    assert score_one("MRC", ["北京", "1998年"], [" 北京 ", "1998"],
                     benchmark="firefly") == pytest.approx(0.5)
    # 中立: P=R=1/2, F1=1/2; 蕴含: 1; 矛盾: 0; 不知道: 0 -> macro 1.5/4 = 0.375.
    assert score_one("NLI", ["中立", "蕴含", "矛盾", "中立"], ["中立", "蕴含", "中立", "不知道"],
                     benchmark="firefly") == pytest.approx(0.375)
    # 积极 F1 1, 消极 (never predicted) 0, "" 0 -> 1/3.
    assert score_one("SentimentAnalyze", ["积极", "消极"], ["积极", ""],
                     benchmark="firefly") == pytest.approx(1 / 3)
    # 相似: P=1/2 R=1 F1=2/3; 不相似: P=0 (not predicted) -> 0: macro 1/3.
    assert score_one("TextMatching", ["相似", "不相似"], ["相似", "相似"],
                     benchmark="firefly") == pytest.approx(1 / 3)
