"""bench/saved_memory.py counts each tensor saved for backward once, by its last dimension, without parameters."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from saved_memory import saved_bytes  # noqa: E402


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
