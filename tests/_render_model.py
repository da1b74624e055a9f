"""A user's own model for the render entry-point test (``--model _render_model:factory``): a small velocity model
with the bundled model's contract, and factories that break the contract."""

import torch
import torch.nn as nn


class TinyVelocity(nn.Module):
    """``forward(x [B, 3, 8, 8], t [B], y [B]) -> v [B, 3, 8, 8]``; label 3 is the null (CFG) label."""

    class_names = ["red", "green", "blue"]

    def __init__(self):
        super().__init__()
        self.config = {"in_channels": 3, "sample_size": 8, "num_classes": 3}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.out = nn.Conv2d(8, 3, 1)
            self.emb = nn.Embedding(4, 8)
            self.temb = nn.Linear(1, 8)

    def forward(self, x, t, y):
        h = self.conv(x) + self.emb(y)[:, :, None, None] + self.temb(t[:, None].to(x.dtype))[:, :, None, None]
        return self.out(torch.tanh(h))


def factory():
    return TinyVelocity()


def not_a_model():
    return "a string"


def raises():
    raise RuntimeError("weights not found")


def rank1_differs():
    """The factory's model with one bias nudged on rank 1: workers whose weights differ."""
    import os

    model = TinyVelocity()
    if os.environ.get("RANK") == "1":
        with torch.no_grad():
            model.out.bias.add_(1e-3)
    return model


def one_name_too_many():
    """Four class names for three classes: the fourth, "white", would be label 3, the null (CFG) label."""
    model = TinyVelocity()
    model.class_names = ["red", "green", "blue", "white"]
    return model
