"""bench/schedule_ceiling.py samples with fixed skip schedules; its sampler must be the library's sampler when
nothing is skipped (else its PSNR figures would measure a different trajectory), and must differ when a step is
skipped (negative control)."""

import pytest
import torch
from _bench import load_bench

from jetdet.models import bundled, sampling


@pytest.fixture(scope="module")
def ceiling():
    return load_bench("schedule_ceiling")


@pytest.mark.skipif(not bundled.DIT_FILE.exists(), reason="bundled weights not shipped")
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_full_schedule_is_the_library_sampler(ceiling, sampler):
    smp = ceiling.Sampler(seeds=[3], classes=[2], steps=5, cfg=4.0, sampler=sampler)
    full = list(range(smp.evals))
    ref = sampling.sample(smp.model, [2], steps=5, cfg=4.0, sampler=sampler, seed=3)
    for fc in ceiling.FORECASTS:
        assert torch.equal(smp.run(full, fc), ref), fc
    assert smp.model_calls == len(ceiling.FORECASTS) * smp.evals
    skipped = [e for e in full if e != 2]
    for fc in ceiling.FORECASTS:
        assert not torch.equal(smp.run(skipped, fc), ref), fc


def test_power_schedule(ceiling):
    for p in (1.0, 1.5, 2.0):
        s = ceiling.power_schedule(30, 10, p)
        assert s[:2] == [0, 1] and s == sorted(set(s)) and s[-1] == 29 and len(s) <= 10
    assert ceiling.power_schedule(30, 10, 1.0, last=25)[-1] == 25
    assert ceiling.power_schedule(30, 10, 1.0) == [0, 1, 2, 6, 10, 14, 17, 21, 25, 29]


def test_cpu_costs_script_runs(tmp_path):
    """bench/cpu_costs.py (the README's piece-by-piece figures) runs end to end and writes every section."""
    mod = load_bench("cpu_costs")
    threads = torch.get_num_threads()
    try:
        mod.main(["--repeats", "1", "--markdown", str(tmp_path / "c.md")])
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "c.md").read_text()
    for head in ("### Convolutions", "### Linears", "### Router", "NaN fill", "all 14 convs", "all 19 linears"):
        assert head in text, head
