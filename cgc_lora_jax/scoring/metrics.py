"""Metrics shared by the PromptCBLUE and Firefly scorers: set micro-F1, label F1, Chinese Rouge-L.

Set micro-F1 over a task's samples s, with gold and predicted item sets G_s and P_s:

    TP = sum_s |G_s & P_s|,  FP = sum_s |P_s - G_s|,  FN = sum_s |G_s - P_s|
    P = TP / (TP + FP),  R = TP / (TP + FN),  F1 = 2PR / (P + R);  F1 = 0 when TP = 0

(so a task without any gold item scores 0, as the official scorer does).

Label F1 over the labels L observed in gold or prediction (sklearn `classification_report` with
the labels taken from the data): tp_L = #{gold = pred = L}, P_L = tp_L / #{pred = L},
R_L = tp_L / #{gold = L} (0 when the count is 0), F1_L = 2 P_L R_L / (P_L + R_L) (0 if both 0).

    macro-F1    = mean_L F1_L
    weighted-F1 = sum_L #{gold = L} F1_L / N     (N samples; labels only predicted weigh 0)

Chinese Rouge-L (rouge_chinese 1.0.3 on transformers `BasicTokenizer(tokenize_chinese_chars=True)`
tokens): an empty token list becomes `["无", "。"]`, L = LCS(pred, gold) over the whole sequences,
P = L / |pred|, R = L / |gold| and

    F = 2 * (P * R / (P + R + 1e-8))      so identical texts score 0.999999995, not 1.

Usage::

    set_micro_f1([{("a",)}], [{("a",), ("b",)}])          # 0.666...
    rouge_l_chinese("好的。", "")                            # 0.399999995 (placeholder "无 。")
"""

from __future__ import annotations

import unicodedata
from collections.abc import Hashable, Iterable, Sequence

EMPTY_PLACEHOLDER = ("无", "。")  # what the official scorer substitutes for an empty token list



def _mean(values: Iterable[float]) -> float:
    """Left-to-right sum / count as rouge_chinese does (sum() compensates on Python >= 3.12)."""
    total, count = 0.0, 0
    for value in values:
        total += value
        count += 1
    return total / count if count else 0.0


def set_micro_f1(gold_sets: Sequence[frozenset], pred_sets: Sequence[frozenset]) -> float:
    """Micro-F1 of per-sample item sets summed over all samples; 0 without a true positive."""
    tp = fp = fn = 0
    for gold, pred in zip(gold_sets, pred_sets, strict=True):
        tp += len(gold & pred)
        fp += len(pred - gold)
        fn += len(gold - pred)
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def _label_f1(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> tuple[dict, dict]:
    """Per-label F1 and gold support over the labels observed on either side."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predicted labels")
    true_count: dict = {}
    pred_count: dict = {}
    tp: dict = {}
    for g, p in zip(gold, pred):
        true_count[g] = true_count.get(g, 0) + 1
        pred_count[p] = pred_count.get(p, 0) + 1
        if g == p:
            tp[g] = tp.get(g, 0) + 1
    f1 = {}
    for label in sorted(true_count.keys() | pred_count.keys()):
        hits = tp.get(label, 0)
        precision = hits / pred_count[label] if pred_count.get(label) else 0.0
        recall = hits / true_count[label] if true_count.get(label) else 0.0
        f1[label] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f1, true_count


def macro_f1(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """Unweighted mean of per-label F1 over every label seen in gold or prediction."""
    f1, _ = _label_f1(gold, pred)
    return _mean(f1.values())


def weighted_f1(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """Per-label F1 averaged with the gold support as weights (sklearn "weighted avg")."""
    f1, support = _label_f1(gold, pred)
    if not gold:
        return 0.0
    total = 0.0
    for label, value in f1.items():
        total += value * support.get(label, 0)
    return total / len(gold)


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp: int) -> bool:
    """The CJK ideograph blocks BasicTokenizer isolates (not kana, hangul or CJK punctuation)."""
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF
        or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF or 0x2F800 <= cp <= 0x2FA1F
    )


def chinese_tokens(text: str) -> list[str]:
    """BERT BasicTokenizer (transformers 4.28.1 defaults): one token per CJK ideograph and per
    punctuation mark, lower-cased, accents stripped, other runs split on whitespace.

    >>> chinese_tokens("做个CT检查，20mg。")
    ['做', '个', 'ct', '检', '查', '，', '20mg', '。']
    """
    cleaned = []
    for char in text:
        cp = ord(char)
        if cp == 0 or cp == 0xFFFD:
            continue
        if char in " \t\n\r":
            cleaned.append(" ")
            continue
        category = unicodedata.category(char)
        if category.startswith("C"):
            continue
        if category == "Zs":
            cleaned.append(" ")
        elif _is_cjk(cp):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    tokens = []
    for piece in "".join(cleaned).split():
        piece = unicodedata.normalize("NFD", piece.lower())
        word = []
        for char in piece:
            if unicodedata.category(char) == "Mn":
                continue
            if _is_punctuation(char):
                if word:
                    tokens.append("".join(word))
                    word = []
                tokens.append(char)
            else:
                word.append(char)
        if word:
            tokens.append("".join(word))
    return " ".join(tokens).split()


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004): O(|a| |b| / 64).

    Bit i of V is 1 while position i of `a` is not yet matched; for each element y of `b`,
    U = V & match(y), V = (V + U) | (V - U); the LCS length is the number of zero bits of V.
    """
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    wanted = set(b)
    positions: dict = {}
    for i, token in enumerate(a):
        if token in wanted:
            positions.setdefault(token, []).append(i)
    match = {}
    for token, where in positions.items():
        bits = bytearray((where[-1] >> 3) + 1)
        for i in where:
            bits[i >> 3] |= 1 << (i & 7)
        match[token] = int.from_bytes(bits, "little")
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & match.get(token, 0)
        v = (v + u) | (v - u)  # bits carried past len(a) never reach back down; masked below
    return len(a) - (v & full).bit_count()


def rouge_l_f(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """rouge_chinese's Rouge-L F of two token lists, 2 * (P * R / (P + R + 1e-8)); 0 if one is
    empty."""
    if not pred_tokens or not gold_tokens:
        return 0.0
    common = lcs_length(pred_tokens, gold_tokens)
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_l_chinese(pred: str, gold: str) -> float:
    """Official PromptCBLUE Rouge-L of one pair of stripped texts, with the `无 。` placeholder."""
    pred_tokens = chinese_tokens(pred) or list(EMPTY_PLACEHOLDER)
    gold_tokens = chinese_tokens(gold) or list(EMPTY_PLACEHOLDER)
    return rouge_l_f(pred_tokens, gold_tokens)


def mean_rouge_l_chinese(pairs: Iterable[tuple[str, str]]) -> float:
    """Mean of `rouge_l_chinese(pred, gold)` over (pred, gold) pairs; 0 when there is no pair."""
    return _mean(rouge_l_chinese(pred, gold) for pred, gold in pairs)
