"""``python -m jetdet.bench``'s command line and its static section: ``--help`` prints the whole description,
the default static report is the representative sm_90 subset (every kernel function, dtype and flag
combination once) and ``--full-static`` the full one, with progress on stderr."""

from __future__ import annotations

import io
import re

import pytest

from jetdet import bench
from jetdet import static_report as sr


def _words(text: str) -> list[str]:
    return text.split()


def test_help_prints_the_whole_description(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    description = bench.__doc__.replace("``", "")
    # every word of the module docstring, in order (argparse used to print only its first line, which stops
    # mid-sentence at "Prints, for this machine:")
    assert " ".join(_words(description)) in " ".join(_words(out))
    assert "5. fast mode on the bundled model" in out  # the numbered list keeps its line breaks
    assert "--full-static" in out


@pytest.mark.parametrize("argv, want", [
    (["--only", "static", "--skip-static"], "--skip-static: contradicts --only static"),
    (["--only", "determinism", "--full-static"], "--full-static: the static section does not run with --only"),
    (["--plot", "/nonexistent/dir/p.png"], "--plot: cannot write into the folder"),
    (["--only", "fast", "--plot", "p.xyz"], "--plot: expected a .png file name"),
    (["--only", "fast", "--plot", "/proc/jetdet.png"], "--plot: cannot write '/proc/jetdet.png'"),
])
def test_flags_that_would_run_nothing_or_fail_late_are_refused(argv, want, capsys):
    """Checked before any section runs (a bad --plot used to fail after the fast section's minute of sampling)."""
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and want in capsys.readouterr().err


def test_a_plot_name_taken_by_a_folder_is_refused_and_a_free_one_left_alone(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "d.png"
    folder.mkdir()
    with pytest.raises(SystemExit):
        bench.main(["--only", "fast", "--plot", str(folder)])
    assert "is a folder; expected a .png file name" in capsys.readouterr().err

    class Checked(Exception):
        pass

    def stop():
        raise Checked  # the flags passed their checks; nothing runs

    monkeypatch.setattr(bench, "environment", stop)
    with pytest.raises(Checked):
        bench.main(["--only", "fast", "--plot", str(tmp_path / "p.png")])
    assert not (tmp_path / "p.png").exists()  # the up-front write test leaves no empty file behind


def test_quick_specs_cover_every_kernel_function_and_dtype_on_one_arch():
    specs = sr.collect_specs()
    declared = [s for s in specs if s.launch is None]
    quick = sr.quick_specs(specs)
    assert quick and all(s.launch is None for s in quick)  # jit=False: no JIT-specialisation rows
    # on sm_90, except a group no spec of which runs there (attention's one-loop variants: sm_90 runs the split
    # loops), which compiles its first spec on that spec's newest arch
    groups: dict = {}
    for s in declared:
        groups.setdefault(sr._group_key(s), []).append(s)
    for s in quick:
        members = groups[sr._group_key(s)]
        on_jit_arch = any(sr.JIT_ARCH in m.archs for m in members)
        assert s.archs == ((sr.JIT_ARCH,) if on_jit_arch else (max(members[0].archs),)), (s.name, s.archs)
    assert sum(s.archs == (sr.JIT_ARCH,) for s in quick) > len(quick) // 2

    def fn_and_pointers(s):
        return getattr(s.fn, "fn", s.fn), tuple(sorted(v for v in s.signature.values() if v.startswith("*")))

    assert {fn_and_pointers(s) for s in quick} == {fn_and_pointers(s) for s in declared}
    names = {s.name for s in declared}
    assert all(s.name in names for s in quick)  # shipped configs, not new ones
    assert 4 * len(quick) < len(sr.pairs(specs))  # the point: far fewer compiles than the full report
    with_jit = sr.quick_specs(specs, jit=True)
    assert [s for s in with_jit if s.launch is None] == quick
    assert [s for s in with_jit if s.launch is not None] == [s for s in specs if s.launch is not None]


def _fake_report(calls):
    def report(specs, archs, progress=None, **_):
        calls.append((list(specs), tuple(archs)))
        rows = []
        for spec, arch in sr.pairs(specs, archs):
            rows.append(
                {"kernel": spec.name, "arch": arch, "regs": 32, "stack": 0, "local": 0, "shared": 0, "hmma": 0,
                 "hgmma": 0, "tf32": 0, "atomics": 0, "mufu": 0, "ffma": 0, "narrow_loads": 0, "instructions": 10,
                 "deterministic": spec.deterministic, "forbid": [], "cached": False, "error": None}
            )  # fmt: skip
        return rows

    return report


@pytest.mark.parametrize("full", [False, True])
def test_static_section_compiles_the_subset_by_default(monkeypatch, capsys, full):
    """The section's bookkeeping without compiling: one report() call, the subset for sm_90 by default and
    every pair for sm_80/89/90 with --full-static, rows attributed to their module."""
    calls: list = []
    monkeypatch.setattr(sr, "report", _fake_report(calls))
    assert bench.static(full=full)
    out = capsys.readouterr().out
    ((specs, archs),) = calls
    every = sr.collect_specs()
    if full:
        assert archs == sr.DEFAULT_ARCHS and len(sr.pairs(specs, archs)) == len(sr.pairs(every))
        assert re.search(r"^  matmul\s+\d+ kernel/arch pairs", out, re.M)
    else:
        assert archs == (sr.JIT_ARCH,)
        assert len(sr.pairs(specs, archs)) < len(sr.pairs(every)) // 4
        assert "--full-static" in out
        noise = [s.name for s in specs if s.name.startswith("noise.") and " jit[" in s.name]
        assert noise and not [s.name for s in specs if " jit[" in s.name and not s.name.startswith("noise.")]
    # one summary line per module, and the counts add up to the rows the report returned
    counts = [int(m.group(1)) for m in re.finditer(r"^  \w+\s+(\d+)(?: of +\d+)? kernel/arch pairs", out, re.M)]
    assert len(counts) == len(sr.KERNEL_MODULES) and sum(counts) == len(sr.pairs(specs, archs))


def test_progress_counts_every_compile_without_a_terminal():
    stream = io.StringIO()
    bar = sr.Progress("static report", stream=stream)
    bar.start(20, cached=3)
    for _ in range(20):
        bar.step()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("static report: 0/20 compiled, 3 cached, 0:0")
    assert lines[-1].startswith("static report: 20/20 compiled")
    assert len(lines) == 11  # not a terminal: one line per tenth, no carriage returns
    assert "\r" not in stream.getvalue()
    quiet = io.StringIO()
    sr.Progress(stream=quiet).start(0, cached=12)  # everything cached: nothing to show
    assert quiet.getvalue() == ""
