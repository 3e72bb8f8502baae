"""Retrieval metrics for text-to-product-photo search.

Every metric takes one ranking per query, best first, and returns the mean over queries, so numbers from
different runs and papers compare one to one. Two conventions hold throughout, because silently dropping
queries or shrinking k would flatter a model:

* a query with nothing relevant scores 0 and still counts in the mean (as in the KDD Cup 2020 scorer);
* a ranking shorter than k counts its missing places as misses (P@k and HP@K still divide by k).

Rankings must not repeat an id: a repeat would count one product twice, and the KDD Cup scorer rejects it.
Plain numpy, so evaluation runs where torch is not installed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

Ranking = Sequence[str]
Path = Sequence[str]  # a category path, root first: ("Apparel", "Topwear", "Tshirts")

# MRR and mAP see only the ranking they are given: over top-10 lists (hsl eval on a store, training's
# validation) they are MRR@10 and mAP@10, and are named so. Reports written before they carried the
# depth called them "MRR" and "mAP"; `current_names` reads those.
TOP10_OLD_NAMES = {"MRR": "MRR@10", "mAP": "mAP@10"}


def current_names(metrics: dict[str, float]) -> dict[str, float]:
    """A top-10 report (an old result.json or metrics.json entry) with today's names: "MRR" -> "MRR@10"."""
    return {TOP10_OLD_NAMES.get(name, name): value for name, value in metrics.items()}


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def _check_queries(ranked: Sequence, other: Sequence, other_name: str) -> None:
    """Refuse inputs that would make a mean meaningless or misalign queries with their answers."""
    if len(ranked) == 0:
        raise ValueError("no queries given: metrics are means over queries and need at least one")
    if len(other) != len(ranked):
        raise ValueError(f"{len(ranked)} rankings but {len(other)} {other_name}: need one per query")


def _check_ranking(ranking: Ranking, query: int) -> None:
    # A bare string is a Sequence[str] too; taking it as a list of one-letter ids would give garbage.
    if isinstance(ranking, str):
        raise TypeError(f"query {query}: ranking is a string, expected a list of ids")
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"query {query}: ranking repeats an id, so one product would count twice")


def _pairs(ranked: Sequence[Ranking], relevant: Sequence[Collection[str]]) -> list[tuple[Ranking, set[str]]]:
    _check_queries(ranked, relevant, "relevant sets")
    for i, ranking in enumerate(ranked):
        _check_ranking(ranking, i)
    return [(ranking, set(rel)) for ranking, rel in zip(ranked, relevant, strict=True)]


def _dcg(gains: np.ndarray) -> float:
    """DCG with linear gain, sum(g_i / log2(i + 2)) for i = 0, 1, ...

    Written term for term like the KDD Cup 2020 scorer's dcg_at_k (first gain undiscounted, then
    log2(3), log2(4), ...) so that ndcg_at_5_kdd reproduces its floats bit for bit.
    """
    if gains.size == 0:
        return 0.0
    return float(gains[0] + np.sum(gains[1:] / np.log2(np.arange(3, gains.size + 2))))


def recall_at_k(ranked: Sequence[Ranking], relevant: Sequence[Collection[str]], k: int) -> float:
    """Share of queries with at least one relevant id in the top k.

    With relevant = [{own id}] per query this is the instance Recall@K that retrieval papers report.
    """
    _check_k(k)
    return float(np.mean([any(x in rel for x in ranking[:k]) for ranking, rel in _pairs(ranked, relevant)]))


def mrr(ranked: Sequence[Ranking], relevant: Sequence[Collection[str]]) -> float:
    """Mean reciprocal rank of the first relevant id over the whole ranking; 0 where none is retrieved."""
    scores = []
    for ranking, rel in _pairs(ranked, relevant):
        rank = next((i for i, x in enumerate(ranking, 1) if x in rel), None)
        scores.append(0.0 if rank is None else 1.0 / rank)
    return float(np.mean(scores))


def precision_at_k(ranked: Sequence[Ranking], relevant: Sequence[Collection[str]], k: int) -> float:
    """Mean share of relevant ids among the top k; always divided by k so short rankings are not rewarded."""
    _check_k(k)
    return float(np.mean([sum(x in rel for x in ranking[:k]) / k for ranking, rel in _pairs(ranked, relevant)]))


def average_precision(ranked_one: Ranking, relevant_one: Collection[str]) -> float:
    """AP of one query: sum of P@i at each relevant rank i, divided by the number of relevant items.

    Dividing by all relevant items (not only the retrieved ones) is the standard definition: a ranking
    that misses relevant products must not score 1. 0 when the query has nothing relevant.
    """
    _check_ranking(ranked_one, 0)
    rel = set(relevant_one)
    if not rel:
        return 0.0
    hits, total = 0, 0.0
    for i, x in enumerate(ranked_one, 1):
        if x in rel:
            hits += 1
            total += hits / i
    return total / len(rel)


def mean_average_precision(ranked: Sequence[Ranking], relevant: Sequence[Collection[str]]) -> float:
    """Mean of average_precision over queries."""
    return float(np.mean([average_precision(ranking, rel) for ranking, rel in _pairs(ranked, relevant)]))


def ndcg_at_5_kdd(ranked: Sequence[Ranking], relevant: Sequence[Collection[str]]) -> float:
    """NDCG@5 exactly as the KDD Cup 2020 Multimodalities Recall official scorer computes it.

    Kept separate from graded_ndcg_at_k so our numbers can sit next to the leaderboard's: relevance is
    binary (gain 2^r - 1 = r for r in {0, 1}), the ideal DCG is that of [1.0] * len(set(ground_truth))
    cut at 5, a query with no ground truth scores 0, and the mean runs over all queries. Unlike the
    official reader, which demands exactly 5 distinct ids per query, a shorter ranking is accepted and
    scored on the ids it has.
    """
    # Official scorer: eval.py shipped with the Tianchi data of KDD Cup 2020 Multimodalities Recall
    # (https://tianchi.aliyun.com/competition/entrance/231786/information), copied into the teams' repos:
    #   dcg_at_k(r, k):  r = r[:k]; r[0] + sum(r[1:] / log2(arange(3, len(r) + 2)))
    #   get_ndcg(r, ref, k): dcg_at_k(ref, k) == 0 -> 0, else dcg_at_k(r, k) / dcg_at_k(ref, k)
    #   ref_vec = [1.0] * len(set(gt)); pred_vec = [1.0 if pid in gt else 0.0 ...]; score_sum / len(reference)
    total = 0.0
    pairs = _pairs(ranked, relevant)
    for ranking, truth in pairs:
        ideal = _dcg(np.ones(min(len(truth), 5)))
        if not ideal:
            continue
        total += _dcg(np.array([1.0 if x in truth else 0.0 for x in ranking[:5]])) / ideal
    # A plain running sum, as the scorer does; np.mean's pairwise sum could differ in the last bit.
    return total / len(pairs)


def graded_ndcg_at_k(
    ranked_gains: Sequence[Sequence[float]], ideal_gains: Sequence[Sequence[float]], k: int
) -> float:
    """NDCG@k with graded gains in [0, 1], e.g. how much of the category path a returned item shares.

    Linear gain, DCG = sum(g_i / log2(i + 2)): with gains already in [0, 1] the exponential form
    2^g - 1 would shrink partial credit (a half match would be worth 0.41, not 0.5), while the linear
    form keeps credit proportional to the grade and equals the exponential one on binary gains, so it
    agrees with ndcg_at_5_kdd there. ideal_gains holds the best gains the query could get from the
    whole gallery, in any order (sorted descending here); a query whose ideal is all zero scores 0.
    """
    _check_k(k)
    _check_queries(ranked_gains, ideal_gains, "ideal gain lists")
    scores = []
    for i, (got, best) in enumerate(zip(ranked_gains, ideal_gains, strict=True)):
        got_arr = np.asarray(got, dtype=np.float64)[:k]
        best_arr = np.sort(np.asarray(best, dtype=np.float64))[::-1][:k]
        for name, arr in (("ranked_gains", got_arr), ("ideal_gains", best_arr)):
            if not np.all((arr >= 0.0) & (arr <= 1.0)):
                raise ValueError(f"query {i}: {name} must lie in [0, 1]")
        ideal = _dcg(best_arr)
        if ideal == 0.0:
            scores.append(0.0)
            continue
        score = _dcg(got_arr) / ideal
        if score > 1.0 + 1e-9:
            raise ValueError(f"query {i}: ranked gains beat ideal_gains; the ideal must list the best gains "
                             "available to the query")
        scores.append(min(score, 1.0))
    return float(np.mean(scores))


def _shared_depth(path: Path, query: tuple[str, ...]) -> int:
    if isinstance(path, str):
        raise TypeError(f"category path {path!r} is a string, expected a tuple like ('Apparel', 'Topwear')")
    depth = 0
    for a, b in zip(path, query, strict=False):  # paths may differ in depth
        if a != b:
            break
        depth += 1
    return depth


def hierarchical_precision_at_k(
    ranked_paths: Sequence[Sequence[Path]], query_paths: Sequence[Path], k: int
) -> float:
    """Hierarchical precision HP@K: credit for near misses in the category tree, not only exact hits.

    Each returned item scores the length of the common prefix of its category path with the query's
    path, divided by the depth of the query's path; HP@K is the mean of these scores over the top k
    places (missing places score 0), then the mean over queries. So for the query path
    ("Apparel", "Topwear", "Tshirts") a T-shirt scores 1, a shirt ("Apparel", "Topwear", "Shirts") 2/3,
    jeans ("Apparel", "Bottomwear", "Jeans") 1/3 and shoes 0; an item anywhere under a coarser query
    path such as ("Apparel", "Topwear") scores 1. Paths are compared from the root, so equal leaf names
    under different parents do not match.

    This is the retrieval form of the hierarchical precision of DeViSE (Frome et al., NeurIPS 2013) as
    used for HUSE (Narayana et al., 2019). DeViSE's exact form scores predicted *labels*: the correct set
    is the true label grown by hierarchy hops until it holds at least k labels, and HP@K is the share of
    the k predictions inside it. That does not fit item retrieval: the k returned items share few labels,
    so a set of "at least k labels" has no meaning for them, and growing it needs the whole label tree.
    The prefix form needs only the paths and gives graded credit per item.
    """
    _check_k(k)
    _check_queries(ranked_paths, query_paths, "query paths")
    scores = []
    for i, (items, query_path) in enumerate(zip(ranked_paths, query_paths, strict=True)):
        if isinstance(query_path, str) or len(query_path) == 0:
            raise ValueError(f"query {i}: query path must be a non-empty tuple of category names")
        query = tuple(query_path)
        scores.append(sum(_shared_depth(p, query) for p in items[:k]) / (len(query) * k))
    return float(np.mean(scores))


def summarize(
    ranked: Sequence[Ranking], relevant: Sequence[Collection[str]], ks: Sequence[int] = (1, 5, 10),
    depth: int | None = None,
) -> dict[str, float]:
    """The standard report in one call: R@k, MRR, mAP, P@k and the KDD Cup NDCG@5. `depth`: the rankings
    are cut at this many (MRR and mAP then say so: "MRR@10"); None: they are whole (a KDD Cup pool)."""
    at = f"@{depth}" if depth is not None else ""
    out = {f"R@{k}": recall_at_k(ranked, relevant, k) for k in ks}
    out[f"MRR{at}"] = mrr(ranked, relevant)
    out[f"mAP{at}"] = mean_average_precision(ranked, relevant)
    out.update({f"P@{k}": precision_at_k(ranked, relevant, k) for k in ks})
    out["NDCG@5"] = ndcg_at_5_kdd(ranked, relevant)
    return out
