"""bench/saved_memory.py counts each tensor saved for backward once, by its last dimension, without parameters."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from saved_memory import peak_saved_bytes, saved_bytes  # noqa: E402


class Square(torch.nn.Module):
    """loss = sum(linear(x)^2): autograd saves x (for the weight gradient) and linear(x) (for the square)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.linear(x)
        return type("Out", (), {"loss": (y * y).sum()})


def test_counts_saved_activations_once_and_not_parameters():
    x = torch.randn(5, 4)
    total, by_dim = saved_bytes(Square(), {"x": x})
    assert by_dim == {4: 5 * 4 * 4, 3: 5 * 3 * 4}  # x, and y once although the product saves it twice
    assert total == 5 * 4 * 4 + 5 * 3 * 4


class Scratch(torch.nn.Module):
    """A forward that builds a large graph and backpropagates through it (as a WRITE step does, which frees it)
    before the small graph it returns: the peak counts the large graph alone, not the sum."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        wide = x.repeat(10, 1)  # 50 x 4
        scratch = (wide * self.weight).exp().sum()  # saves wide (for the weight) and the exp output: 2 x 800 bytes
        torch.autograd.grad(scratch, self.weight)  # frees that graph
        y = x * self.weight  # saves x (80 bytes); the weight is a parameter, not counted
        return type("Out", (), {"loss": y.sum()})


def test_peak_counts_what_is_alive_at_once():
    x = torch.randn(5, 4)
    assert peak_saved_bytes(Square(), {"x": x}) == 5 * 4 * 4 + 5 * 3 * 4  # nothing freed before the backward
    assert peak_saved_bytes(Scratch(), {"x": x}) == 2 * 50 * 4 * 4
