"""Retrieval metrics: each checked against values worked out by hand, plus edge cases and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsl.metrics import (
    average_precision,
    current_names,
    graded_ndcg_at_k,
    hierarchical_precision_at_k,
    mean_average_precision,
    mrr,
    ndcg_at_5_kdd,
    precision_at_k,
    recall_at_k,
    summarize,
)

# Three queries: hits at ranks 2 and 3; nothing relevant retrieved; hits at ranks 1 and 4 with a third
# relevant id ("z") never retrieved. The second and first rankings are shorter than 5 and 10.
RANKED = [["a", "b", "c", "d"], ["e", "f", "g"], ["h", "i", "j", "k", "l", "m"]]
RELEVANT = [{"b", "c"}, {"x"}, {"h", "k", "z"}]


def log2(x: float) -> float:
    return math.log2(x)


def test_recall_at_k_by_hand() -> None:
    assert recall_at_k(RANKED, RELEVANT, 1) == pytest.approx((0 + 0 + 1) / 3)  # only "h" at rank 1
    assert recall_at_k(RANKED, RELEVANT, 2) == pytest.approx((1 + 0 + 1) / 3)  # "b" enters at rank 2
    assert recall_at_k(RANKED, RELEVANT, 10) == pytest.approx((1 + 0 + 1) / 3)  # k beyond every ranking


def test_instance_recall_with_own_id() -> None:
    ranked = [["q1", "q2"], ["q1", "q2"]]
    assert recall_at_k(ranked, [{"q1"}, {"q2"}], 1) == pytest.approx(1 / 2)
    assert recall_at_k(ranked, [{"q1"}, {"q2"}], 2) == pytest.approx(2 / 2)


def test_mrr_by_hand() -> None:
    assert mrr(RANKED, RELEVANT) == pytest.approx((1 / 2 + 0 + 1 / 1) / 3)


def test_precision_at_k_by_hand() -> None:
    assert precision_at_k(RANKED, RELEVANT, 1) == pytest.approx((0 + 0 + 1) / 3)
    assert precision_at_k(RANKED, RELEVANT, 3) == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    # k = 10 is longer than every ranking; the missing places count as misses: still divided by 10.
    assert precision_at_k(RANKED, RELEVANT, 10) == pytest.approx((2 / 10 + 0 / 10 + 2 / 10) / 3)


def test_average_precision_by_hand() -> None:
    assert average_precision(RANKED[0], RELEVANT[0]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision(RANKED[1], RELEVANT[1]) == 0.0
    # "z" is never retrieved but still counts in the denominator.
    assert average_precision(RANKED[2], RELEVANT[2]) == pytest.approx((1 / 1 + 2 / 4) / 3)
    assert average_precision(["a", "b"], set()) == 0.0  # no ground truth


def test_mean_average_precision_by_hand() -> None:
    expected = ((1 / 2 + 2 / 3) / 2 + 0 + (1 / 1 + 2 / 4) / 3) / 3
    assert mean_average_precision(RANKED, RELEVANT) == pytest.approx(expected)


def test_ndcg_at_5_kdd_by_hand() -> None:
    # Binary gains 2^r - 1 over the top 5; IDCG from [1.0] * len(ground truth) cut at 5.
    q1 = ((2**1 - 1) / log2(3) + (2**1 - 1) / log2(4)) / (1 / log2(2) + 1 / log2(3))  # hits at 2, 3; |gt| = 2
    q2 = 0.0  # "x" not retrieved
    q3 = (1 / log2(2) + 1 / log2(5)) / (1 / log2(2) + 1 / log2(3) + 1 / log2(4))  # hits at 1, 4 ("m" at 6 cut)
    assert ndcg_at_5_kdd(RANKED, RELEVANT) == pytest.approx((q1 + q2 + q3) / 3)


def test_ndcg_at_5_kdd_edge_cases() -> None:
    # A query without ground truth scores 0 and still counts in the mean.
    assert ndcg_at_5_kdd([["a"], ["b"]], [{"a"}, set()]) == pytest.approx((1 + 0) / 2)
    # Seven ground-truth ids: IDCG caps at 5 places, so five hits in a row is a perfect score.
    truth = {f"p{i}" for i in range(7)}
    assert ndcg_at_5_kdd([[f"p{i}" for i in range(5)]], [truth]) == pytest.approx(1.0)
    # A hit at rank 6 is past the cut.
    assert ndcg_at_5_kdd([["n1", "n2", "n3", "n4", "n5", "r"]], [{"r"}]) == 0.0
    # A ranking of 2 ids, hit at rank 2, two ground-truth ids.
    assert ndcg_at_5_kdd([["n", "r"]], [{"r", "s"}]) == pytest.approx((1 / log2(3)) / (1 / log2(2) + 1 / log2(3)))


def _kdd_official_score(predictions: list[list[str]], reference: list[list[str]]) -> float:
    """The KDD Cup 2020 scorer's arithmetic, restated: dcg_at_k / get_ndcg, summed then divided."""

    def dcg(r: list[float], k: int) -> float:
        arr = np.asarray(r, dtype=np.float64)[:k]
        return float(arr[0] + np.sum(arr[1:] / np.log2(np.arange(3, arr.size + 2)))) if arr.size else 0.0

    score_sum = 0.0
    for pred, gt in zip(predictions, reference, strict=True):
        gt_ids = set(gt)
        dcg_max = dcg([1.0] * len(gt_ids), 5)
        score_sum += dcg([1.0 if p in gt_ids else 0.0 for p in pred], 5) / dcg_max if dcg_max else 0.0
    return score_sum / len(reference)


IDS = [f"p{i}" for i in range(9)]
queries = st.lists(
    st.tuples(st.lists(st.sampled_from(IDS), unique=True, max_size=9), st.sets(st.sampled_from(IDS))),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(queries)
def test_ndcg_at_5_kdd_matches_official_arithmetic_exactly(qs: list[tuple[list[str], set[str]]]) -> None:
    # The official reader takes exactly 5 distinct ids; pad short rankings with ids that are never relevant.
    ranked = [r + [f"pad{i}" for i in range(5 - len(r))] for r, _ in qs]
    relevant = [rel for _, rel in qs]
    assert ndcg_at_5_kdd(ranked, relevant) == _kdd_official_score(ranked, [sorted(g) for g in relevant])


def test_graded_ndcg_by_hand() -> None:
    ranked_gains = [[1 / 3, 1.0, 0.0], [0.5, 0.5], [1.0]]
    ideal_gains = [[0.0, 2 / 3, 1.0, 1.0], [0.0, 0.0], [0.5, 1.0]]  # any order: sorted descending inside
    q1 = (1 / 3 / log2(2) + 1 / log2(3) + 0 / log2(4)) / (1 / log2(2) + 1 / log2(3) + (2 / 3) / log2(4))
    q2 = 0.0  # ideal all zero
    q3 = (1 / log2(2)) / (1 / log2(2) + 0.5 / log2(3))  # one gain for k = 3: the missing places count 0
    assert graded_ndcg_at_k(ranked_gains, ideal_gains, 3) == pytest.approx((q1 + q2 + q3) / 3)
    # At k = 1 only the first place counts.
    assert graded_ndcg_at_k(ranked_gains[:1], ideal_gains[:1], 1) == pytest.approx((1 / 3) / 1)


def test_graded_ndcg_rejects_bad_gains() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        graded_ndcg_at_k([[1.5]], [[1.0]], 1)
    with pytest.raises(ValueError, match="beat ideal_gains"):
        graded_ndcg_at_k([[1.0, 1.0]], [[1.0, 0.5]], 2)


def test_hierarchical_precision_by_hand() -> None:
    tshirts = ("Apparel", "Topwear", "Tshirts")
    returned = [
        ("Apparel", "Topwear", "Tshirts"),  # 3 shared of 3
        ("Apparel", "Topwear", "Shirts"),  # 2 of 3
        ("Apparel", "Bottomwear", "Jeans"),  # 1 of 3
        ("Footwear", "Shoes", "Casual Shoes"),  # 0 of 3
        ("Apparel", "Topwear", "Tshirts"),  # place 5, past k = 4
    ]
    watches = ("Accessories", "Watches", "Watches")
    short = [("Accessories", "Watches", "Watches"), ("Accessories", "Bags", "Handbags")]  # 2 items, k = 4
    q1 = (3 / 3 + 2 / 3 + 1 / 3 + 0 / 3) / 4
    q2 = (3 / 3 + 1 / 3 + 0 + 0) / 4
    assert hierarchical_precision_at_k([returned, short], [tshirts, watches], 4) == pytest.approx((q1 + q2) / 2)
    assert hierarchical_precision_at_k([returned], [tshirts], 1) == pytest.approx(1.0)


def test_hierarchical_precision_compares_from_the_root() -> None:
    # Same leaf names under another parent share nothing; a coarser query path is fully matched.
    assert hierarchical_precision_at_k([[("Footwear", "Casual", "Shoes")]], [("Apparel", "Casual", "Shoes")], 1) == 0
    assert hierarchical_precision_at_k([[("Apparel", "Topwear", "Tshirts")]], [("Apparel", "Topwear")], 1) == 1


def test_summarize_keys_and_values() -> None:
    out = summarize(RANKED, RELEVANT)
    assert list(out) == ["R@1", "R@5", "R@10", "MRR", "mAP", "P@1", "P@5", "P@10", "NDCG@5"]
    assert out["R@5"] == pytest.approx(2 / 3)
    assert out["P@5"] == pytest.approx((2 / 5 + 0 + 2 / 5) / 3)
    assert out["MRR"] == pytest.approx(mrr(RANKED, RELEVANT))
    assert out["NDCG@5"] == ndcg_at_5_kdd(RANKED, RELEVANT)
    assert all(isinstance(v, float) for v in out.values())
    top10 = summarize([r[:10] for r in RANKED], RELEVANT, depth=10)  # cut lists: MRR and mAP say so
    assert list(top10)[3:5] == ["MRR@10", "mAP@10"] and top10["MRR@10"] == mrr([r[:10] for r in RANKED], RELEVANT)
    old = {"R@10": 0.5, "MRR": 0.25, "mAP": 0.2}  # a report written before the rename still reads
    assert current_names(old) == {"R@10": 0.5, "MRR@10": 0.25, "mAP@10": 0.2} == current_names(current_names(old))


@pytest.mark.parametrize(
    "call",
    [
        lambda: recall_at_k([], [], 1),
        lambda: mrr([], []),
        lambda: precision_at_k([], [], 1),
        lambda: mean_average_precision([], []),
        lambda: ndcg_at_5_kdd([], []),
        lambda: graded_ndcg_at_k([], [], 1),
        lambda: hierarchical_precision_at_k([], [], 1),
        lambda: summarize([], []),
    ],
)
def test_empty_query_list_is_refused(call) -> None:
    with pytest.raises(ValueError, match="no queries"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: recall_at_k(RANKED, RELEVANT, 0),
        lambda: precision_at_k(RANKED, RELEVANT, -1),
        lambda: graded_ndcg_at_k([[1.0]], [[1.0]], 0),
        lambda: hierarchical_precision_at_k([[("a",)]], [("a",)], 0),
    ],
)
def test_k_below_one_is_refused(call) -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        call()


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="one per query"):
        mrr(RANKED, RELEVANT[:2])
    with pytest.raises(ValueError, match="repeats an id"):
        recall_at_k([["a", "a"]], [{"a"}], 1)
    with pytest.raises(TypeError, match="string"):
        mrr(["ab"], [{"a"}])  # a bare string instead of a list of ids
    with pytest.raises(ValueError, match="non-empty"):
        hierarchical_precision_at_k([[("a",)]], [()], 1)


@settings(max_examples=200, deadline=None)
@given(queries, st.integers(1, 12))
def test_metrics_lie_in_unit_interval(qs: list[tuple[list[str], set[str]]], k: int) -> None:
    ranked = [r for r, _ in qs]
    relevant = [rel for _, rel in qs]
    values = list(summarize(ranked, relevant, ks=(1, k)).values())
    values.append(graded_ndcg_at_k([[1.0 if x in rel else 0.0 for x in r] for r, rel in qs],
                                   [[1.0] * len(rel) for rel in relevant], k))
    values.append(hierarchical_precision_at_k([[tuple(x) for x in r] for r in ranked], [("p", "1")] * len(qs), k))
    assert all(0.0 <= v <= 1.0 for v in values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sets(st.sampled_from(IDS), min_size=1), st.permutations(IDS)), min_size=1, max_size=4))
def test_perfect_ranking_scores_one(qs: list[tuple[set[str], list[str]]]) -> None:
    # Every relevant id first, then the rest: recall, MRR, mAP and both NDCGs are 1.
    ranked = [sorted(rel) + [x for x in rest if x not in rel] for rel, rest in qs]
    relevant = [rel for rel, _ in qs]
    out = summarize(ranked, relevant, ks=(1, 5))
    for key in ("R@1", "R@5", "MRR", "mAP", "NDCG@5"):
        assert out[key] == pytest.approx(1.0), key
    gains = [[1.0 if x in rel else 0.0 for x in r] for r, rel in zip(ranked, relevant, strict=True)]
    assert graded_ndcg_at_k(gains, gains, 5) == pytest.approx(1.0)
