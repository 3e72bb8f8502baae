"""SGML and HUSE losses against values computed by hand (pytorch-metric-learning style), their
no-valid-pairs cases, backward(), and their config blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hsl.config import config_from_dict, config_to_dict, load_config
from hsl.errors import HSLUsageError
from hsl.huse import HUSELoss, class_name_distances
from hsl.losses import LossBatch, LossContext, build_losses
from hsl.model import ImageEncoding, TextEncoding
from hsl.sgml import SGMLLoss, attribute_similarity, soft_binomial_deviance


def sp(x: float) -> float:
    """softplus: log(1 + e^x), the binomial deviance of margin -x."""
    return math.log1p(math.exp(x))


def batch(images: list, texts: list, keys: list, labels: dict, grad: bool = False) -> LossBatch:
    """A LossBatch whose index and query vectors (the "total" embedding) are the given rows, and so are
    its deepest image vectors v^L and image queries q2^L (the "deepest" embedding)."""
    image = torch.tensor(images, dtype=torch.float32, requires_grad=grad)
    text = torch.tensor(texts, dtype=torch.float32, requires_grad=grad)
    encoding = ImageEncoding([image.unsqueeze(1)], [image], torch.ones(len(images), 1, dtype=torch.bool))
    return LossBatch(torch.tensor(keys), None, TextEncoding([], [text]), encoding,
                     {c: torch.tensor(v) for c, v in labels.items()}, index_vectors=image, query_vectors=text)


def test_attribute_similarity_by_hand():
    labels = torch.tensor([[0, 1], [0, 2], [1, -1]])  # column weights 2 and 1
    g = attribute_similarity(labels, torch.tensor([2.0, 1.0]))
    # g01: column 0 agrees (2 of 3); g02, g12: nothing agrees; g22: a missing value (-1) never matches.
    want = [[1, 2 / 3, 0], [2 / 3, 1, 0], [0, 0, 2 / 3]]
    assert g.flatten().tolist() == pytest.approx(sum(want, []))


def test_soft_binomial_deviance_by_hand():
    scores = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.5, 0.7], [0.3, 0.4, 0.8]])
    g = torch.tensor([[1, 2 / 3, 0], [2 / 3, 1, 0], [0, 0, 2 / 3]])
    loss = soft_binomial_deviance(scores, torch.eye(3, dtype=torch.bool), g, alpha=2.0, beta=0.5, negative_cost=2.0)
    # positives: sp(-2 (s - 0.5)) for s = 0.9, 0.5, 0.8 -> 0.3711, 0.6931, 0.4375; mean 0.5006
    positives = (sp(-0.8) + sp(0.0) + sp(-0.6)) / 3
    # negatives: (1 - g) sp(2 * 2 (s - 0.5)); (0,1) s 0.6 g 2/3 -> 0.9130 / 3, (1,0) s 0.2 g 2/3 -> 0.2633 / 3,
    # (0,2) 0.1 -> 0.1839, (1,2) 0.7 -> 1.1711, (2,0) 0.3 -> 0.3711, (2,1) 0.4 -> 0.5130; sum / 6 negatives = 0.4385
    negatives = (sp(0.4) / 3 + sp(-1.6) + sp(-1.2) / 3 + sp(0.8) + sp(-0.8) + sp(-0.4)) / 6
    assert positives + negatives == pytest.approx(0.939115, abs=1e-6)
    assert loss.item() == pytest.approx(positives + negatives, rel=1e-6)


def test_sgml_loss_by_hand_with_duplicates_and_full_attribute_match():
    # Unit vectors (texts are normalised by the loss: (2, 0) -> (1, 0), (4, 3) -> (0.8, 0.6)).
    images = [[1, 0], [0, 1], [0.6, 0.8], [-1, 0]]
    texts = [[2, 0], [0, 1], [4, 3], [0, -3]]
    # cosine S[i][j] = <t_i, v_j>: [[1, 0, .6, -1], [0, 1, .8, 0], [.8, .6, .96, -.8], [0, -1, -.8, 0]]
    loss = SGMLLoss(["kind"], [1.0], [2], embed_dim=2, alpha=2.0, beta=0.5, negative_cost=2.0, attribute_weight=0.5)
    torch.nn.init.zeros_(loss.head.weight)
    torch.nn.init.zeros_(loss.head.bias)  # every logit 0: each BCE term is log 2, 2 log 2 per column of 2 values
    got = loss(batch(images, texts, keys=[0, 0, 1, 2], labels={"kind": [0, 0, 1, 1]}))
    # positives: the diagonal and the duplicates (0,1), (1,0): s = 1, 0, 0, 1, .96, 0
    positives = (sp(-1) + sp(1) + sp(1) + sp(-1) + sp(-0.92) + sp(1)) / 6
    # 10 negatives, sp(4 (s - .5)); (2,3) and (3,2) share the one attribute (g = 1) and weigh 0
    negatives = (sp(0.4) + sp(-6) + sp(1.2) + sp(-2) + sp(1.2) + sp(0.4) + sp(-2) + sp(-6)) / 10
    assert got.item() == pytest.approx(positives + negatives + 0.5 * 2 * math.log(2), rel=1e-6)


def test_sgml_no_negatives_and_no_labels_is_finite_with_grads():
    loss = SGMLLoss(["kind", "colour"], [1.0, 1.0], [3, 2], embed_dim=2)
    one = batch([[0.6, 0.8]], [[1.0, 0.0]], keys=[5], labels={"kind": [-1], "colour": [-1]}, grad=True)
    value = loss(one)  # no negative pair, every attribute missing: only the positive's deviance is left
    assert value.item() == pytest.approx(sp(-2 * (0.6 - 0.5)), rel=1e-6)
    value.backward()
    assert torch.isfinite(one.image.images[0].grad).all() and torch.isfinite(one.text.image_queries[0].grad).all()
    same = batch([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], keys=[3, 3], labels={"kind": [0, 1],
                                                                                         "colour": [0, 0]})
    assert torch.isfinite(loss(same))  # all pairs positive (one product twice): no negatives


def test_sgml_backward_reaches_head_and_embeddings():
    torch.manual_seed(0)
    loss = SGMLLoss(["kind", "colour"], [1.0, 0.5], [3, 2], embed_dim=4)
    data = batch(torch.randn(5, 4).tolist(), torch.randn(5, 4).tolist(), keys=[0, 1, 1, 2, 3],
                 labels={"kind": [0, 1, 1, 2, -1], "colour": [1, 0, 0, 1, 1]}, grad=True)
    loss(data).backward()
    grads = [loss.head.weight.grad, data.image.images[0].grad, data.text.image_queries[0].grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_class_name_distances_by_hand():
    a = class_name_distances(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    # cos = 0 for the first two; 1/sqrt(2) between either and the third: distance 1 - 0.7071 = 0.2929
    far = 1 - 1 / math.sqrt(2)
    assert a.flatten().tolist() == pytest.approx([0, 1, far, 1, 0, far, far, far, 0], abs=1e-7)


def test_huse_loss_by_hand():
    loss = HUSELoss("kind", torch.tensor([[0.0, 0.3], [0.3, 0.0]]), embed_dim=2, class_weight=1.0, graph_weight=2.0,
                    gap_weight=0.5, zeta=0.5, logit_scale=1.0)
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.eye(2))
        loss.classifier.bias.zero_()  # logits = the unit embedding itself
    images, texts = [[1, 0], [0.6, 0.8]], [[0.8, 0.6], [0, 1]]
    got = loss(batch(images, texts, keys=[0, 1], labels={"kind": [0, 1]}))
    # L_cls: CE = log(1 + e^(other - own)); images (1,0)->0: sp(-1), (.6,.8)->1: sp(-.2); texts the same two.
    cls = (sp(-1) + sp(-0.2)) / 2
    # L_graph over x = (i0, i1, t0, t1), cosine distances d and A: (i0,i1) d .4 A .3 -> .01; (i0,t0) d .2 A 0 -> .04;
    # (i0,t1) d 1 > zeta -> out; (i1,t0) d .04 A .3 -> .0676; (i1,t1) d .2 A 0 -> .04; (t0,t1) d .4 A .3 -> .01.
    # Sum .1676 over 6 unordered pairs (the ordered form counts each twice, over 12 pairs: the same mean).
    graph = 0.1676 / 6
    # L_gap: ||(1,0)-(.8,.6)||^2 = .04 + .36 = .4 and ||(.6,.8)-(0,1)||^2 = .36 + .04 = .4; mean .4
    assert got.item() == pytest.approx(cls + 2.0 * graph + 0.5 * 0.4, rel=1e-5)


def test_huse_no_valid_pairs_and_backward():
    loss = HUSELoss("kind", torch.zeros(3, 3), embed_dim=2, zeta=0.5)
    unlabelled = batch([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], keys=[0, 1], labels={"kind": [-1, -1]},
                       grad=True)
    value = loss(unlabelled)  # no class: no L_cls and no graph pair; the gap of identical pairs is 0
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(unlabelled.image.images[0].grad).all()
    torch.manual_seed(1)
    data = batch(torch.randn(4, 3).tolist(), torch.randn(4, 3).tolist(), keys=[0, 1, 2, 3],
                 labels={"kind": [0, 2, 2, -1]}, grad=True)
    loss = HUSELoss("kind", class_name_distances(torch.randn(3, 5)), embed_dim=3, zeta=2.0)
    loss(data).backward()
    assert torch.isfinite(loss.classifier.weight.grad).all() and loss.classifier.weight.grad.abs().sum() > 0
    assert torch.isfinite(data.text.image_queries[0].grad).all()


def test_embedding_choice_total_or_deepest():
    vectors = torch.tensor([[3.0, 4.0]])
    encoding = ImageEncoding([vectors.unsqueeze(1)], [], torch.ones(1, 1, dtype=torch.bool))  # object-only
    one = LossBatch(torch.tensor([0]), None, TextEncoding([vectors], []), encoding, {"kind": torch.tensor([0])},
                    index_vectors=torch.tensor([[1.0, 0.0]]), query_vectors=torch.tensor([[0.0, 2.0]]))
    deepest = SGMLLoss(["kind"], [1.0], [1], embed_dim=2, attribute_weight=0.0, embedding="deepest")
    # object-only: the deepest embedding is mean_k o_k^L and q1^L, both (.6, .8): cosine 1
    assert deepest(one).item() == pytest.approx(sp(-2 * (1.0 - 0.5)), rel=1e-6)
    total = SGMLLoss(["kind"], [1.0], [1], embed_dim=2, attribute_weight=0.0)
    assert total(one).item() == pytest.approx(sp(-2 * (0.0 - 0.5)), rel=1e-6)  # index (1, 0) vs query (0, 1)
    with pytest.raises(HSLUsageError, match="index and query vectors"):
        total(LossBatch(torch.tensor([0]), None, one.text, one.image, one.labels))


def test_config_blocks_round_trip_and_validate(tmp_path):
    config = load_config("hsl-tiny-objectives")
    assert config.sgml.attributes == {"colour": 1.0, "kind": 1.0} and config.huse.class_column == "kind"
    assert config_from_dict(config_to_dict(config), "x") == config
    assert not {"hsl", "sgml"} & set(config_to_dict(load_config("hsl-tiny")))  # configs without blocks: unchanged
    one = config_from_dict({**config_to_dict(config), "hsl": {"granularities": ["image"]}}, "x")
    assert one.hsl.granularities == ("image",) and config_from_dict(config_to_dict(one), "x") == one
    data = config_to_dict(config)
    defaults = config_from_dict({**data, "sgml": None}, "x")  # "sgml" named without a block: the defaults
    assert defaults.sgml.alpha == 2.0 and defaults.sgml.negative_cost == 25.0 and defaults.sgml.attributes == {}
    cases = [({"huse": None}, "needs a \"huse\" block"), ({"sgml": {"gamma": 1}}, "'gamma'"),
             ({"losses": {"hsl": 1.0, "sgml": -1}}, r"losses\['sgml'\]"),
             ({"sgml": {"attributes": {"kind": "x"}}}, r"attributes\['kind'\]"),
             ({"huse": {"class_weight": 1.0}}, "class_column"), ({"sgml": {"beta": 3}}, "beta"),
             ({"hsl": {"granularities": ["region"]}}, "hsl: granularities must be distinct"),
             ({"hsl": {"w": 1}}, "'w'")]
    for change, message in cases:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(HSLUsageError, match=message):
            load_config(path)


def test_build_losses_sizes_heads_from_the_context():
    config = load_config("hsl-tiny-objectives")
    context = LossContext({"colour": ["blue", "red"], "kind": ["dress", "shirt", "shoe"]}, {"colour": 1.0, "kind": 1.0},
                          torch.zeros(3, 3))
    losses = build_losses(config, context)
    assert list(losses) == ["hsl", "sgml", "huse"]
    assert losses["sgml"].head.out_features == 5 and losses["huse"].classifier.out_features == 3
    with pytest.raises(HSLUsageError, match="class-name distances"):
        build_losses(config, LossContext(context.vocab, context.attribute_weights))
