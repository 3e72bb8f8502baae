"""hsl/dropout.py: the CPU dropout with PCG64 bits keeps dropout's contract."""

import torch
from torch import nn

from hsl.dropout import Dropout, use_fast_dropout


def test_dropout_zeroes_p_of_the_values_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    x = torch.rand(512, 1024) + 0.5
    for p in (0.1, 0.5):
        y = Dropout(p).train()(x)
        dropped = (y == 0).float().mean().item()
        assert abs(dropped - p) < 0.005
        kept = y != 0
        assert torch.allclose(y[kept], x[kept] / (1 - round(p * 65536) / 65536))
        assert abs(y.mean().item() / x.mean().item() - 1) < 0.01


def test_dropout_is_the_identity_in_eval_and_at_p_zero() -> None:
    x = torch.randn(4, 7)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_dropout_is_seeded_and_carries_gradients() -> None:
    x = torch.randn(3, 5, 8, requires_grad=True)
    torch.manual_seed(1)
    a = Dropout(0.2).train()(x)
    torch.manual_seed(1)
    b = Dropout(0.2).train()(x)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad, (a != 0).float() / (1 - round(0.2 * 65536) / 65536))


def test_every_dropout_of_a_transformer_layer_is_replaced() -> None:
    layer = use_fast_dropout(nn.TransformerEncoderLayer(16, 2, 32, 0.1, batch_first=True))
    assert not any(type(m) is nn.Dropout for m in layer.modules())
    assert sum(isinstance(m, Dropout) for m in layer.modules()) == 3
    layer.train()(torch.randn(2, 3, 16)).sum().backward()  # the python path, the one training takes
