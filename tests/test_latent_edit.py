"""``bench/latent_edit.py``: latents edited mid-run (a ``callback_on_step_end`` that flips them) are not seen by the
step cache, which goes on forecasting from the path before the edit; ``handle.new_trajectory()`` after the edit,
the README's advice, gives the quality back. The flip without it is the negative control: it must cost quality, or
the advice would be untested."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="diffusers is an optional extra (pip install '.[diffusers]')")


def test_new_trajectory_after_an_edit_gives_the_quality_back():
    path = Path(__file__).resolve().parent.parent / "bench" / "latent_edit.py"
    spec = importlib.util.spec_from_file_location("latent_edit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (_, plain, _), (_, edited, _), (_, restarted, saved) = mod.measure(steps=20, edit_at=8)
    assert edited < plain - 10, (plain, edited)  # the edit unseen costs quality (negative control)
    assert restarted > edited + 10 and restarted > plain - 3, (plain, edited, restarted)
    assert saved > 0
