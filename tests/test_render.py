"""jetdet.render in one process: same bytes at any batch size, the noise rule, resume, verify/compare, bad input,
--force, a user's model through the entry point, fast mode, the progress line, and nothing of the caller's left
changed. The multi-process runs (1/2/3 workers, SIGKILL, torchrun restarts) are in test_render_dist.py."""

from __future__ import annotations

import builtins
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from _render_util import checksums, files, items, manifest, snapshot

import jetdet
from jetdet.models import bundled
from jetdet.models.sampling import sample
from jetdet.render import RenderError, compare, load_spec, render, verify
from jetdet.render.__main__ import main
from jetdet.render.check import _ranges
from jetdet.render.spec import Item, spec_hash
from jetdet.render.store import item_name, read_item

STEPS = 2
JOB = {"items": 12, "steps": STEPS, "seed": 3}

pytestmark = pytest.mark.skipif(not bundled.DIT_FILE.exists(), reason="the bundled weights are not there")


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """The 12-item deterministic job at batch 1 (one worker)."""
    out = tmp_path_factory.mktemp("render") / "ref_b1"
    r = _render({**JOB, "batch_size": 1}, out)
    assert r.complete and r.rendered == 12 and r.kept == 0
    return out


def _render(spec, out, **kw):
    """render() with one torch thread and no progress line by default: with 2 threads an op waits for the second
    thread, and on a loaded 2-core machine that made these runs 8x slower (56 s against 7 s for the reference)."""
    kw.setdefault("threads", 1)
    kw.setdefault("progress", False)
    return render(spec, out, **kw)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ same bytes


def test_batch_sizes_give_the_same_bytes(ref, tmp_path):
    """Deterministic mode, one worker, batch 1 / 4 / 5 (5 does not divide 12): every item file byte-identical and
    every manifest checksum equal."""
    ref_items = items(ref)
    assert len(ref_items) == 12
    for bs in (4, 5):
        out = tmp_path / f"b{bs}"
        _render({**JOB, "batch_size": bs}, out)
        assert items(out) == ref_items, f"batch {bs}"
        assert checksums(out) == checksums(ref)
        assert {e["batch_size"] for e in manifest(out)["items"].values()} == {bs}
        report = verify(out, against=ref)
        assert report and report.comparison.equal == list(range(12)), "\n".join(report.lines())


def test_items_are_what_sample_draws(ref):
    """The noise rule: a range with one seed renders exactly sample(model, labels, seed=seed) of the whole list in
    one batch (here batch 12), item i from jetdet.randn(seed, item_offset=i)."""
    model = bundled.load_bundled()
    labels = [i % 10 for i in range(12)]
    with jetdet.mode("deterministic"):
        want = sample(model, labels, steps=STEPS, seed=3)
    m = manifest(ref)
    for i in range(12):
        image, meta = read_item(ref / item_name(i))
        assert torch.equal(image, want[i]), i
        assert (meta["index"], meta["label"], meta["seed"], meta["stream"]) == (str(i), str(labels[i]), "3", str(i))
        assert m["items"][str(i)]["checksum"] == jetdet.checksum(want[i])


def test_mode_off_differs_negative_control(tmp_path):
    """Negative control: in mode off, plain torch kernels give batch-dependent bytes, and verify --against names
    the items that differ."""
    a, b = tmp_path / "off_b1", tmp_path / "off_b5"
    _render({**JOB, "mode": "off", "batch_size": 1}, a)
    _render({**JOB, "mode": "off", "batch_size": 5}, b)
    differ = [k for k in items(a) if items(a)[k] != items(b)[k]]
    assert differ, "mode off gave the same bytes at batch 1 and 5: the determinism test could not fail"
    report = verify(a, against=b)
    assert not report and report.comparison.differ
    d = report.comparison.differ
    text = "\n".join(report.lines())
    assert (f"item {d[0]}: checksum differs" if len(d) <= 10 else f"items {_ranges(d)}: checksum differs") in text
    assert f"{len(d)} differ" in report.lines()[1]


# ---------------------------------------------------------------------------------------------- resume


def test_resume_skips_done_and_recomputes_the_rest(ref, tmp_path):
    out = _copy(ref, tmp_path / "job")
    again = _render({**JOB, "batch_size": 4}, out)
    assert (again.kept, again.rendered, again.recomputed) == (12, 0, {})

    m = manifest(out)
    (out / item_name(2)).unlink()  # missing
    data = bytearray((out / item_name(5)).read_bytes())
    data[-7] ^= 0x01  # a flipped bit in the image data
    (out / item_name(5)).write_bytes(bytes(data))
    del m["items"]["9"]  # written, then killed before it was reported: never trusted, even when it parses
    (out / item_name(9)).write_bytes((out / item_name(8)).read_bytes())
    (out / "manifest.json").write_text(json.dumps(m))
    (out / (item_name(11) + ".tmp-123-abcd")).write_bytes(b"partial")  # a killed writer's temp file
    r = _render({**JOB, "batch_size": 4}, out)
    assert r.rendered == 3 and r.kept == 9 and r.temp_removed == 1
    assert set(r.recomputed) == {2, 5, 9}
    assert "missing" in r.recomputed[2] and "corrupt" in r.recomputed[5] and "not in the manifest" in r.recomputed[9]
    assert files(out).keys() == files(ref).keys()  # the temp file is gone
    assert items(out) == items(ref) and checksums(out) == checksums(ref)
    assert manifest(out)["complete"]


def test_verify_names_a_corrupt_item_and_a_rerun_fixes_it(ref, tmp_path, capsys):
    out = _copy(ref, tmp_path / "job")
    assert main(["verify", str(out)]) == 0  # control: an intact folder passes
    path = out / item_name(7)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "item 7 (item-000007.safetensors): file corrupt" in text and "verify: FAILED" in text
    assert [line.split(" (")[0] for line in text.splitlines() if line.startswith("  item")] == ["  item 7"]
    report = verify(out)
    assert list(report.problems) == [7] and len(report.ok) == 11

    r = _render({**JOB, "batch_size": 4}, out)
    assert r.rendered == 1 and list(r.recomputed) == [7]
    assert verify(out) and items(out) == items(ref)


def test_verify_a_header_byte_and_an_incomplete_job(ref, tmp_path):
    out = _copy(ref, tmp_path / "job")
    path = out / item_name(0)
    data = bytearray(path.read_bytes())
    data[12] ^= 0x20  # inside the JSON header: the tensor may still load, the file's sha256 changes
    path.write_bytes(bytes(data))
    m = manifest(out)
    del m["items"]["4"]
    (out / "manifest.json").write_text(json.dumps(m))
    (out / item_name(4)).unlink()
    report = verify(out)
    assert set(report.problems) == {0, 4}
    assert "corrupt" in report.problems[0] and "not rendered yet" in report.problems[4]


def test_verify_of_a_job_stopped_early_is_a_line_per_problem_not_per_item(ref, tmp_path):
    """verify printed one line per item not rendered yet: 90k lines for a 100k-item job stopped at 10%. More than ten
    items with one problem are one line of ranges; a few are still named one a line."""
    out = _copy(ref, tmp_path / "job")
    m = manifest(out)
    m["items"] = {k: v for k, v in m["items"].items() if k == "0"}
    (out / "manifest.json").write_text(json.dumps(m))
    for i in range(1, 12):
        (out / item_name(i)).unlink()
    (out / item_name(0)).write_bytes(b"torn")
    lines = verify(out).lines()
    assert lines[1].startswith("  item 0 (item-000000.safetensors): file corrupt: "), lines
    assert lines[2:] == ["  items 1-11 (11): not rendered yet (the job is incomplete: rerun it)", "verify: FAILED"]


def test_verify_names_item_files_that_are_not_of_the_job(ref, tmp_path, capsys):
    """Item files whose index the job does not have (here one copied in as item 12, and item 99): verify said OK,
    so a folder of 12 items holding 14 item files passed, as would two range jobs (``start``) merged by copying
    into one folder. Now they are named and verify fails; other files (a note) are left alone."""
    out = _copy(ref, tmp_path / "job")
    (out / "notes.txt").write_text("mine")
    assert verify(out)  # control: an intact folder with a file of the user's own passes
    for i in (12, 99):
        shutil.copy(out / item_name(3), out / item_name(i))
    report = verify(out)
    assert not report and report.not_of_the_job == [12, 99] and not report.problems
    assert main(["verify", str(out)]) == 1
    assert "2 item file(s) not of this job (the manifest's item list has no such index): items 12, 99" in (
        capsys.readouterr().out)


def test_verify_against_a_folder_rechecks_its_files_too(ref, tmp_path, capsys):
    """A user trial: ``verify A --against B`` with one of B's item files damaged and one deleted said "64 identical
    checksums ... verify: OK": the comparison read B's checksums from B's manifest alone. A folder given as
    ``against`` has its files rechecked too; a manifest file alone is still compared as it is."""
    other = _copy(ref, tmp_path / "other")
    assert main(["verify", str(ref), "--against", str(other)]) == 0  # control: an intact copy passes
    path = other / item_name(5)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # in the image data
    path.write_bytes(bytes(data))
    (other / item_name(9)).unlink()
    report = verify(ref, against=other)
    assert not report and not report.problems and report.comparison.ok  # the manifests alone agree
    assert sorted(report.against_problems) == [5, 9] and "file missing" in report.against_problems[9]
    capsys.readouterr()
    assert main(["verify", str(ref), "--against", str(other)]) == 1
    text = capsys.readouterr().out
    assert f"2 item file(s) of {other} do not match its manifest" in text and "verify: FAILED" in text
    assert "item 5 (item-000005.safetensors): file corrupt" in text
    assert verify(ref, against=other / "manifest.json")  # a manifest alone: compared by its checksums


def test_verify_against_a_half_copied_folder_is_a_line_per_problem(ref, tmp_path):
    """``--against`` a folder missing many of its files (a copy stopped halfway) printed a line per missing file (1000
    lines for 1000 of 2000); its problems are grouped as the folder's own are: ranges past ten."""
    other = _copy(ref, tmp_path / "other")
    for i in range(11):
        (other / item_name(i)).unlink()
    report = verify(ref, against=other)
    assert sorted(report.against_problems) == list(range(11))
    lines = report.lines()
    assert lines[-2:] == ["    items 0-10 (11): file missing", "verify: FAILED"], lines

def test_compare_of_two_item_lists_counts_the_items_that_are_not_the_same(ref, tmp_path):
    """Two jobs whose items differ (other seeds): the head line said "12 items in both, 0 identical checksums, 0
    differ", then one line per item. Now it counts them and lists them as ranges past ten."""
    m = manifest(ref)
    for entry in m["items"].values():
        entry["seed"] += 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps(m))
    lines = verify(ref, against=other).lines()
    assert lines[1].endswith("0 identical checksums, 0 differ, 12 not the same item"), lines[1]
    assert "  items 0-11: not the same item (label, seed or stream differ)" in lines and len(lines) == 6, lines


def test_manifest_names_never_leave_the_folder(ref, tmp_path):
    """File names are derived from item indices, never read from the manifest: an entry pointing outside the folder
    is neither checked nor deleted by --force. A damaged manifest is refused, not half-read."""
    out = _copy(ref, tmp_path / "job")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    m = manifest(out)
    m["items"]["3"]["file"] = "../victim.txt"
    (out / "manifest.json").write_text(json.dumps(m))
    assert verify(out)
    r = _render({**JOB, "items": 2}, out, force=True)  # another job: the old items 2..11 are removed
    assert r.rendered == 2 and victim.read_text() == "keep me"
    assert sorted(items(out)) == [item_name(0), item_name(1)]
    m = manifest(out)
    m["items"]["x"] = {}
    (out / "manifest.json").write_text(json.dumps(m))
    before = snapshot(out)
    with pytest.raises(RenderError, match="is damaged"):
        _render({**JOB, "items": 2}, out)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["sampler", "items_zero", "items_empty", "class", "spec_key", "model", "device"])
def test_bad_spec_is_refused_and_the_folder_left_alone(ref, tmp_path, case, capsys):
    out = _copy(ref, tmp_path / "job")
    before = snapshot(out)
    bad = {
        "sampler": ({**JOB, "sampler": "dpm++"}, "sampler: expected one of 'euler', 'heun', got 'dpm++'"),
        "items_zero": ({**JOB, "items": 0}, "items: expected at least one item, got count 0"),
        "items_empty": ({**JOB, "items": []}, "items: expected at least one item, got an empty list"),
        "class": ({**JOB, "items": {"count": 3, "classes": [1, "hexagon"]}}, "items.classes[1]: unknown class name"),
        "spec_key": ({**JOB, "stepz": 3}, "spec: unknown key(s) ['stepz']"),
        "model": ({**JOB, "model": "no_such_module_xyz:f"}, "model: cannot import module 'no_such_module_xyz'"),
        "device": ({**JOB, "device": "cuda"}, "device: 'cuda' requested, but torch.cuda.is_available() is False"),
    }
    if case == "device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec, message = bad[case]
    with pytest.raises(RenderError, match=None) as e:
        _render(spec, out)
    assert message in str(e.value)
    assert snapshot(out) == before
    # and through the command line: exit status 2 and the same message
    if case == "sampler":
        assert main(["run", "--out", str(out), "--count", "12", "--steps", "2", "--sampler", "dpm++"]) == 2
    elif case == "items_zero":
        assert main(["run", "--out", str(out), "--count", "0"]) == 2
    else:
        return
    assert message in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_step_count_the_sampler_cannot_take_is_refused_before_the_folder_is_made(tmp_path, capsys):
    """A user trial: "steps": 10**30 in a spec file passed the spec check (an int >= 1), the folder and its manifest
    were written, and the sampler then failed with an OverflowError traceback (10**14: a failed 800 TB allocation)."""
    out = tmp_path / "job"
    for steps in (10**30, 10**14):
        with pytest.raises(RenderError, match=f"steps: expected a number of steps the sampler can take, got {steps}"):
            _render({"items": 1, "steps": steps}, out)
        assert not out.exists()
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"items": 1, "steps": 10**30}))
    assert main(["run", "--spec", str(spec), "--out", str(out)]) == 2 and not out.exists()
    assert "steps: expected a number of steps" in capsys.readouterr().err


def test_a_shift_whose_grid_does_not_run_from_1_to_0_is_refused(tmp_path, capsys):
    """``"shift": 1e-17`` (an accepted positive float) made a timestep grid starting at inf: the job wrote an all-NaN
    image, exit status 0, and verify said OK (1e-16: a grid starting at 0.9, not from noise). Refused now, naming
    the shift, before the folder is made. Control: a shift of 1e-9 still renders."""
    out = tmp_path / "job"
    for shift in (1e-17, 1e-16, 1e-300):
        with pytest.raises(RenderError, match=f"shift: {shift!r} gives a timestep grid that does not run from 1"):
            _render({"items": 1, "steps": 2, "shift": shift}, out)
        assert not out.exists()
    assert main(["run", "--out", str(out), "--count", "1", "--steps", "2", "--shift", "1e-17", "--threads", "1"]) == 2
    assert "shift: 1e-17 gives a timestep grid" in capsys.readouterr().err and not out.exists()
    assert _render({"items": 1, "steps": 2, "shift": 1e-9}, out).complete
    from jetdet.render.store import parse_item

    assert all(bool(torch.isfinite(parse_item(data)[0]).all()) for data in items(out).values())

def test_missing_bundled_weights_are_bad_input_not_a_failed_write(tmp_path, capsys, monkeypatch):
    """The bundled model's weights file missing (a broken install): the command line said "the job stopped. The items
    listed in the manifest are kept: the same command resumes the job", exit status 1, as for a full disk mid-job."""
    monkeypatch.setattr(bundled, "DIT_FILE", tmp_path / "missing.safetensors")
    out = tmp_path / "job"
    assert main(["run", "--out", str(out), "--count", "1", "--steps", "1", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "model: 'bundled': cannot load its weights" in err and "missing.safetensors" in err, err
    assert "the job stopped" not in err and not out.exists()


def test_damaged_bundled_weights_are_bad_input_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A truncated or empty weights file (an interrupted download or copy), or the classifier's in its place: the
    command line raised safetensors' SafetensorError / a ValueError as a traceback. Now exit status 2, naming the
    model and the file, with the folder not made."""
    out = tmp_path / "job"
    data = bundled.DIT_FILE.read_bytes()
    classifier = bundled.CLASSIFIER_FILE.read_bytes()
    for name, content in (("truncated", data[:5000]), ("empty", b""), ("classifier", classifier)):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        monkeypatch.setattr(bundled, "DIT_FILE", path)
        assert main(["run", "--out", str(out), "--count", "1", "--steps", "1", "--threads", "1"]) == 2, name
        err = capsys.readouterr().err
        assert "model: 'bundled': cannot load its weights" in err and str(path) in err, err
        assert not out.exists()


def test_a_folder_of_another_spec_is_refused_unless_forced(ref, tmp_path, capsys):
    out = _copy(ref, tmp_path / "job")
    before = snapshot(out)
    with pytest.raises(RenderError) as e:
        _render({**JOB, "steps": 3}, out)
    msg = str(e.value)
    assert "holds another job" in msg and "steps: 2 in the folder, 3 now" in msg and "--force" in msg
    assert snapshot(out) == before
    assert main(["run", "--out", str(out), "--count", "12", "--seed", "3", "--steps", "2", "--cfg", "2"]) == 2
    assert "cfg: 4.0 in the folder, 2.0 now" in capsys.readouterr().err
    assert snapshot(out) == before
    # a folder with files but no manifest is not ours to write into
    other = tmp_path / "user_folder"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before_other = snapshot(other)
    with pytest.raises(RenderError, match="no jetdet render manifest"):
        _render(JOB, other)
    assert snapshot(other) == before_other

    # --force replaces the job: 6 items now, the old job's items 6..11 removed, the rest recomputed
    r = _render({**JOB, "items": 6, "steps": 3}, out, force=True)
    assert r.rendered == 6 and r.kept == 0
    assert set(r.recomputed.values()) == {"a file of the replaced job, recomputed"}
    assert sorted(items(out)) == [item_name(i) for i in range(6)]
    assert verify(out) and manifest(out)["replaced"] == [manifest(ref)["spec_hash"]]
    c = compare(out, ref)  # another job: the spec difference is named, the items compared where both have them
    assert not c.ok and not c.same_spec and "steps: 3 here, 2 in the other" in c.spec_notes
    assert c.only_other == list(range(6, 12)) and c.differ == list(range(6)) and not c.equal


@pytest.mark.parametrize("case", ["file", "under_a_file"])
def test_an_unwritable_output_path_is_refused(tmp_path, case):
    f = tmp_path / "a_file"
    f.write_text("x")
    out = f if case == "file" else f / "sub" / "out"
    before = snapshot(tmp_path)
    with pytest.raises(RenderError) as e:
        _render(JOB, out)
    assert str(e.value).startswith("out: ")
    assert ("is not a folder" if case == "file" else "cannot create the folder") in str(e.value)
    assert snapshot(tmp_path) == before


def test_a_read_only_folder_is_refused_and_left_as_it_was(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(RenderError, match="out: cannot"):
            _render(JOB, ro / "job")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_manifest_saves_are_spaced_out(ref, tmp_path, monkeypatch):
    """The whole manifest is rewritten at each save, which grows with the job: by default it is saved at the plan and
    at the end (and at most every 10 s between), with ``manifest_every_s=0`` after every round as well. Items
    reported after the last save are recomputed by a rerun, and the bytes are the same either way."""
    from jetdet.render import store

    saves = []
    real = store.save_manifest

    def counted(folder, m):
        saves.append(len(m["items"]))
        time.sleep(0.05)  # a slow save: 0 still means every round (not gated by the save's own time)
        real(folder, m)

    monkeypatch.setattr(store, "save_manifest", counted)
    import inspect

    # the default spacing is 10 s; spaced out here by an hour, so that a loaded machine's slow rounds (over 10 s for
    # the job when three test runs shared the 2 cores) do not add a timed save
    assert inspect.signature(render).parameters["manifest_every_s"].default == store.MANIFEST_EVERY_S == 10
    _render({**JOB, "batch_size": 4}, tmp_path / "spaced", manifest_every_s=3600)
    assert saves == [0, 12], saves  # the plan, the end: not one per round
    saves.clear()
    _render({**JOB, "batch_size": 1}, tmp_path / "every", manifest_every_s=0)
    assert saves == [0, *range(1, 13), 12], saves
    assert items(tmp_path / "spaced") == items(tmp_path / "every") == items(ref)

    # interrupted (Ctrl-C) between saves: the reports gathered so far are saved on the way out
    from jetdet.render import run as render_run

    real_sample, calls = render_run._sample, []

    def interrupted(job, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_sample(job, batch)

    monkeypatch.setattr(render_run, "_sample", interrupted)
    saves.clear()
    with pytest.raises(KeyboardInterrupt):
        _render({**JOB, "batch_size": 1}, tmp_path / "ctrl_c")
    assert saves == [0, 3] and len(manifest(tmp_path / "ctrl_c")["items"]) == 3, saves
    monkeypatch.setattr(render_run, "_sample", real_sample)
    r = _render({**JOB, "batch_size": 1}, tmp_path / "ctrl_c")
    assert r.kept == 3 and r.rendered == 9 and items(tmp_path / "ctrl_c") == items(ref)
    for bad in (-1, float("nan"), float("inf"), "10", True):
        with pytest.raises(RenderError, match="manifest_every_s: expected a finite number of seconds >= 0"):
            _render(JOB, tmp_path / "bad", manifest_every_s=bad)
    assert not (tmp_path / "bad").exists()


def test_a_model_that_breaks_the_contract_is_refused_before_anything_is_written(tmp_path):
    """A factory that raises, a model whose embedding has no row for the unconditional label, and one whose config
    does not match its layers: RenderError naming the model, and no folder (so a fixed model is not refused as
    another job)."""
    import torch.nn as nn

    class Velocity(nn.Module):
        def __init__(self, channels=3, labels=3):
            super().__init__()
            self.config = {"in_channels": channels, "sample_size": 8, "num_classes": 2}
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.emb = nn.Embedding(labels, 3)

        def forward(self, x, t, y):
            return self.conv(x) + self.emb(y)[:, :, None, None]

    class OtherDtype(Velocity):
        def forward(self, x, t, y):
            return super().forward(x, t, y).double()

    for model, want in ((Velocity(labels=2).eval(), "(the unconditional label is 2)): IndexError"),
                        (Velocity(channels=4).eval(), "x [2, 4, 8, 8] float32 from its config"),
                        (OtherDtype().eval(), "returned (2, 3, 8, 8) float64; expected a velocity of the latent's "
                                              "shape and dtype")):
        out = tmp_path / "job"
        with pytest.raises(RenderError, match=r"^model: the model passed to render\(\): a trial forward") as e:
            _render({"items": 2, "steps": 1}, out, model=model)
        assert want in str(e.value) and not out.exists()
    # without guidance (cfg 1) the sampler never passes the unconditional label: such a model is fine there
    r = _render({"items": 2, "steps": 1, "cfg": 1.0}, tmp_path / "unguided", model=Velocity(labels=2).eval())
    assert r.complete and r.rendered == 2
    r = _render({"items": 2, "steps": 1}, tmp_path / "job", model=Velocity().eval())
    assert r.complete and r.rendered == 2


def test_cli_and_folder_mistakes_are_named(ref, tmp_path, capsys):
    """A spec file's count with --count, a missing count, an empty --out, an item name taken by a folder and a
    damaged --against manifest: exit 1 (a problem found) with the argument named, nothing written."""
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"items": 12, "steps": STEPS, "seed": 3}))
    out = tmp_path / "count"
    assert main(["run", "--spec", str(spec), "--count", "3", "--out", str(out), "--threads", "1",
                 "--no-progress"]) == 0
    ref_sums = checksums(ref)  # the files carry their job's spec hash: the images are compared
    assert checksums(out) == {str(i): ref_sums[str(i)] for i in range(3)}
    capsys.readouterr()
    assert main(["run", "--out", str(tmp_path / "none"), "--steps", "2"]) == 2
    assert "--count: required" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(["run", "--out", "", "--count", "1"]) == 2
    assert "out: expected a folder path, got ''" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "none"), "--start", "2"]) == 2
    assert "--count: required" in capsys.readouterr().err
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"items": [{"class": 1}], "steps": 1}))
    for flag, value in (("--classes", "3"), ("--start", "2"), ("--count", "4")):  # the flag given is named
        assert main(["run", "--spec", str(listed), "--out", str(tmp_path / "none"), flag, value]) == 2
        assert f"{flag}: the spec file lists its items one by one" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "none"), "--count", "1", "--manifest-every", "nan"]) == 2
    assert "--manifest-every: expected a finite number of seconds >= 0" in capsys.readouterr().err
    assert main(["verify", ""]) == 2 and "out: expected a render folder, got ''" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    blocked = _copy(ref, tmp_path / "blocked")
    (blocked / item_name(1)).unlink()
    (blocked / item_name(1)).mkdir()
    before = snapshot(blocked)
    with pytest.raises(RenderError, match=r"out: .*item-000001.safetensors' is not a file"):
        _render({**JOB, "batch_size": 1}, blocked)
    assert snapshot(blocked) == before
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text((ref / "manifest.json").read_text()[:200])
    no_items = tmp_path / "no_items.json"
    no_items.write_text(json.dumps({"format": "jetdet.render.manifest/1"}))
    good = json.loads((ref / "manifest.json").read_text())
    bad_fps, bad_key = tmp_path / "bad_fps.json", tmp_path / "bad_key.json"
    bad_fps.write_text(json.dumps({**good, "fingerprints": [1]}))
    bad_key.write_text(json.dumps({**good, "items": {"\u00b2": good["items"]["0"]}}))  # isdigit(), not int()
    for against, want in ((damaged, "cannot be read as a render manifest"), (no_items, "is damaged"),
                          (bad_fps, "is damaged (its fingerprints or runs)"), (bad_key, "is damaged (item keys")):
        assert main(["verify", str(ref), "--against", str(against)]) == 1  # a problem found, not bad input
        err = capsys.readouterr().err
        assert f"against: {str(against / 'manifest.json') if against.is_dir() else str(against)!r} {want}" in err, err


# -------------------------------------------------------------------------------------------- the spec


def test_spec_forms_and_the_noise_rule():
    a = load_spec({"items": {"count": 4, "start": 10, "classes": [2, "circle"]}, "seed": 9})
    b = load_spec({"items": [{"class": 2}, {"prompt": "circle"}, {"class": 2, "seed": 9}, {"class": 0}],
                   "seed": 9})
    names = list(bundled.BUNDLED_CLASSES)
    ea, eb = a.expand(names, 10), b.expand(names, 10)
    assert ea == [Item(10, 2, 9, 10), Item(11, 0, 9, 11), Item(12, 2, 9, 12), Item(13, 0, 9, 13)]
    assert eb == [Item(0, 2, 9, 0), Item(1, 0, 9, 1), Item(2, 2, 9, 2), Item(3, 0, 9, 3)]
    # a range and the same list hash alike; what runs where (batch size, device) is not hashed
    c = load_spec({"items": 4, "seed": 9, "batch_size": 1, "device": "cpu"})
    d = load_spec({"items": [{"class": i} for i in range(4)], "seed": 9})
    hc, hd = spec_hash(c, c.expand(names, 10), "m"), spec_hash(d, d.expand(names, 10), "m")
    assert hc == hd
    assert spec_hash(c, c.expand(names, 10), "other weights") != hc
    e = load_spec({"items": 4, "seed": 9, "steps": 29})
    assert spec_hash(e, e.expand(names, 10), "m") != hc
    # an explicit stream pins an item's noise to its own (seed, stream), wherever it sits
    f = load_spec({"items": [{"class": 1}, {"class": 1, "seed": 4, "stream": 0}]})
    assert f.expand(names, 10)[1] == Item(1, 1, 4, 0)
    with pytest.raises(RenderError, match=r"items\[0\]: expected exactly one of 'class'"):
        load_spec({"items": [{"seed": 1}]})
    with pytest.raises(RenderError, match="budget: only used with mode 'fast'"):
        load_spec({"items": 1, "budget": 0.1})
    with pytest.raises(RenderError, match=r"items.classes\[0\]: expected a class index in \[0, 10\), got 12"):
        load_spec({"items": {"count": 1, "classes": [12]}}).expand(names, 10)


def test_spec_file_and_flags(ref, tmp_path):
    """A JSON spec file plus command-line flags (flags win) renders the same job as the API."""
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"items": {"count": 12, "seed": 0}, "steps": 5, "batch_size": 2}))
    out = tmp_path / "job"
    assert main(["run", "--spec", str(spec), "--out", str(out), "--seed", "3", "--steps", "2", "--batch-size", "5",
                 "--threads", "1", "--no-progress"]) == 0
    assert items(out) == items(ref)
    assert manifest(out)["spec"]["batch_size"] == 5


def test_a_spec_file_giving_a_key_twice_is_refused(tmp_path, capsys):
    """A user trial: a spec file with "steps" given twice (one added at the end of a file that had one) rendered with
    the last value and said nothing. Now every object (the spec, its items) is checked; exit 2, nothing written."""
    out = tmp_path / "job"
    for text, key in (('{"items": 2, "steps": 30, "batch_size": 2, "steps": 1}', "steps"),
                      ('{"items": {"count": 2, "seed": 5, "seed": 6}, "steps": 1}', "seed")):
        spec = tmp_path / "job.json"
        spec.write_text(text)
        assert main(["run", "--spec", str(spec), "--out", str(out), "--threads", "1", "--no-progress"]) == 2
        assert f"spec: {str(spec)!r} gives the key {key!r} twice" in capsys.readouterr().err
        assert not out.exists()
    spec.write_text('{"items": 1, "steps": 1, "steps": 1}')  # the same value twice too, through the API
    with pytest.raises(RenderError, match="gives the key 'steps' twice"):
        load_spec(str(spec))


# ---------------------------------------------------------------------------------------- a user's model


def test_user_model_entry_point(tmp_path, capsys):
    """--model package.module:factory: a user's model with the bundled contract, class names as prompts."""
    import _render_model

    out = tmp_path / "user"
    args = ["run", "--model", "_render_model:factory", "--out", str(out), "--count", "6", "--classes", "red,blue",
            "--steps", "3", "--batch-size", "4", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    with jetdet.mode("deterministic"):
        want = sample(_render_model.factory(), [0, 2, 0, 2, 0, 2], steps=3, seed=0)
    for i in range(6):
        assert torch.equal(read_item(out / item_name(i))[0], want[i])
    assert manifest(out)["spec"]["model"] == "_render_model:factory"
    assert main(["run", "--model", "_render_model:not_a_model", "--out", str(tmp_path / "bad"), "--count", "2"]) == 2
    err = capsys.readouterr().err
    assert "model: entry point '_render_model:not_a_model' gave a str; expected an nn.Module" in err
    assert not (tmp_path / "bad").exists()
    assert main(["run", "--model", "_render_model:raises", "--out", str(tmp_path / "bad"), "--count", "2"]) == 2
    assert "model: entry point '_render_model:raises' raised RuntimeError: weights not found" in \
        capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["run", "--model", "_render_model:factory", "--out", str(tmp_path / "bad"), "--count", "2",
                 "--classes", "circle"]) == 2
    assert "items.classes[0]: unknown class name 'circle'; expected one of ['red', 'green', 'blue']" in \
        capsys.readouterr().err


def test_class_names_past_num_classes_are_refused(tmp_path, capsys):
    """A user trial: a model listing one class name more than its config's num_classes rendered that name's items
    with the unconditional label (label num_classes, what CFG uses for "no class"), silently; two more names failed
    mid-job with a traceback, the folder already written. Now the model is refused before anything is written."""
    import _render_model

    out = tmp_path / "job"
    args = ["run", "--model", "_render_model:one_name_too_many", "--out", str(out), "--count", "2", "--classes",
            "red,white", "--steps", "1", "--threads", "1", "--no-progress"]
    assert main(args) == 2
    assert "has 4 class_names" in capsys.readouterr().err and not out.exists()
    model = _render_model.one_name_too_many().eval()
    with pytest.raises(RenderError, match=r"but num_classes 3 in its config \(label 3 is the unconditional one\)"):
        _render({"items": {"count": 2, "classes": ["white"]}, "steps": 1}, out, model=model)
    assert not out.exists()
    model.class_names = model.class_names[:3]  # control: the same model with its three names renders
    assert _render({"items": {"count": 2, "classes": ["blue"]}, "steps": 1}, out, model=model).complete
    assert {e["label"] for e in manifest(out)["items"].values()} == {2}


def test_force_renders_a_job_of_the_same_spec_again(tmp_path, monkeypatch):
    """README: after changing a model's forward without changing its weights, "render into a new folder or pass
    --force". --force with the same spec resumed instead, keeping every item the old forward had made (a user trial:
    0 rendered, and verify against a fresh folder found all 4 items different). Now --force renders them again; a
    torchrun restart of that forced run (same TORCHELASTIC_RUN_ID, restart count > 0) resumes it."""
    import _render_model

    model = _render_model.TinyVelocity().eval()
    spec = {"items": 4, "steps": 2, "model": "mine"}
    out, fresh = tmp_path / "job", tmp_path / "fresh"
    assert _render(spec, out, model=model).rendered == 4
    old = items(out)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, t, y: 0.5 * forward(x, t, y))  # new code, the same weights
    assert _render(spec, out, model=model).rendered == 0  # a rerun resumes (the spec hash does not see code)
    r = _render(spec, out, model=model, force=True)
    assert r.rendered == 4 and r.kept == 0
    _render(spec, fresh, model=model)
    assert items(out) == items(fresh) != old and verify(out, against=fresh)
    # under torchrun: the first attempt of a forced run replaces, a restart of it resumes, a new run replaces again
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job17")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _render(spec, out, model=model, force=True).rendered == 4
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _render(spec, out, model=model, force=True).kept == 4
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _render(spec, out, model=model, force=True).rendered == 4


def test_force_under_torchruns_default_run_id_is_not_a_restart(tmp_path, monkeypatch):
    """torchrun gives its workers the run id "none" unless --rdzv-id is given (with --master-port, or on several
    nodes): every such launch has it. A forced run whose first attempt was lost before its plan (a worker died loading
    the model) and restarted found an earlier forced run's "none" in the manifest and resumed that run's items, made
    by the old forward: --force did nothing (rendered 0, verify --against a fresh folder: 4 differ)."""
    import _render_model

    model = _render_model.TinyVelocity().eval()
    spec = {"items": 4, "steps": 2, "model": "mine"}
    out = tmp_path / "job"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _render(spec, out, model=model, force=True).rendered == 4  # an earlier forced launch
    old = items(out)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, t, y: 0.5 * forward(x, t, y))  # new code, the same weights
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a new forced launch's restart, its attempt 0 lost early
    r = _render(spec, out, model=model, force=True)
    assert r.rendered == 4 and r.kept == 0 and items(out) != old
    # control: a run id torchrun makes per launch (one node, or --rdzv-id) still resumes its own forced run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "4df1a220-d983")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _render(spec, out, model=model, force=True).rendered == 4
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _render(spec, out, model=model, force=True).kept == 4

def test_model_object_and_the_callers_state_left_alone(tmp_path):
    """render(model=...) uses the caller's model without changing it, restores the thread count and torch's
    flags, and leaves no process group behind; also when it raises."""
    import torch.distributed as dist

    from jetdet.mode import torch_flags

    model = bundled.load_bundled()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    threads, flags = torch.get_num_threads(), torch_flags()
    r = _render({"items": 2, "steps": 1, "model": "my-dit"}, tmp_path / "a", model=model, threads=1)
    assert r.complete
    with pytest.raises(RenderError, match="dtype: the spec says float16"):
        _render({"items": 2, "steps": 1, "dtype": "float16"}, tmp_path / "b", model=model, threads=1)
    assert not (tmp_path / "b").exists()
    assert torch.get_num_threads() == threads and torch_flags() == flags
    assert not (dist.is_available() and dist.is_initialized())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert jetdet.get_mode().value == "off"


def test_fast_mode_renders_and_unpatches(tmp_path):
    model = bundled.load_bundled()
    forward = model.forward
    r = _render({"items": 3, "steps": 4, "mode": "fast", "budget": 0.5}, tmp_path / "fast", model=model,
               progress=False)
    assert r.complete and verify(tmp_path / "fast")
    assert manifest(tmp_path / "fast")["spec"]["budget"] == 0.5
    assert model.forward == forward and jetdet.unpatch(model) is False  # the step cache's patch was removed


# ------------------------------------------------------------------------------------------------ progress


def test_progress_line_tqdm_and_plain(tmp_path, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("tqdm") is not None:  # tqdm is optional (ComfyUI and diffusers bring it)
        _render({"items": 3, "steps": 1, "batch_size": 2}, tmp_path / "a", progress=True)
        err = capsys.readouterr().err
        assert "3/3 items" in err and "item/s]" in err  # tqdm's line: items done, items per second
        assert "render: done: 3/3 items" in err and "items/s" in err

    real_import = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name == "tqdm":
            raise ImportError("no tqdm here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    _render({"items": 3, "steps": 1, "batch_size": 2}, tmp_path / "b", progress=True)
    err = capsys.readouterr().err
    assert "render: 3/3 items, " in err and " items/s" in err
    _render({"items": 3, "steps": 1, "batch_size": 2}, tmp_path / "c")
    assert capsys.readouterr().err == ""


def test_each_worker_gets_a_gpu_of_its_own(monkeypatch):
    """``torchrun`` workers take GPU ``LOCAL_RANK``; more workers than the GPUs a machine shows is a clear error
    (before, two workers shared a GPU and NCCL refused the group at its first collective). A worker that sees one GPU
    (one GPU per task through CUDA_VISIBLE_DEVICES) takes it whatever its LOCAL_RANK. No GPU here: torch's count is
    faked."""
    from jetdet.render import run as render_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert render_run._device("cuda", None) == torch.device("cuda", 1)
    assert render_run._device("auto", None) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(render_run.RenderError, match="LOCAL_RANK=2 has no GPU of its own"):
        render_run._device("cuda", None)
    assert render_run._device("cpu", None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per task (CUDA_VISIBLE_DEVICES)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert render_run._device("cuda", None) == torch.device("cuda", 0)



@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_workers_group_is_gloo_on_gpus_too(monkeypatch, device):
    """The group ``render`` creates under torchrun is gloo also for GPU workers: its collectives are a few pickled
    objects, gloo is what the multi-process tests run, and nccl refused two workers sharing one GPU ("Duplicate GPU
    detected") at the first collective. ``init_process_group`` is faked (no group is made); negative control (run
    by hand): with the old choice (nccl for a CUDA device) the cuda case fails."""
    import torch.distributed as dist

    from jetdet.render import run as render_run

    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: made.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    joined = []  # the workers' own join (rank 0's store) is faked too: no rank 0 runs here
    monkeypatch.setattr(render_run, "_join", lambda *a: joined.append(a) or "store")
    group = render_run._Group(torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
    assert made == ["gloo"] and (group.rank, group.world, group.owned) == (1, 2, True)
    assert joined == [(1, 2, "127.0.0.1", 29500, 600.0)]

# ------------------------------------------------------------------------------- a review's finds, 2026-12-06


def test_force_removes_a_killed_runs_unreported_files_and_replaces_a_damaged_manifest(ref, tmp_path, capsys):
    """--force took out only the replaced job's listed items, so files a killed run had written but not reported
    stayed (and verify passed on the folder); a damaged manifest could not be replaced at all."""
    from jetdet.render import store

    out = _copy(ref, tmp_path / "job")
    m = manifest(out)
    for k in range(6, 12):  # written by a killed run but not yet reported
        del m["items"][str(k)]
    (out / "manifest.json").write_text(json.dumps(m))
    r = _render({**JOB, "items": 2, "steps": 3}, out, force=True)
    assert r.complete and sorted(items(out)) == [item_name(0), item_name(1)]

    (out / "manifest.json").write_text(json.dumps(m)[:200])  # torn
    with pytest.raises(RenderError, match=r"cannot be read as a render manifest.*--force"):
        _render({**JOB, "items": 2}, out)
    r = _render({**JOB, "items": 2}, out, force=True)
    assert r.complete and r.rendered == 2 and verify(out)

    for damaged in ({k: v for k, v in m.items() if k != "total"}, {**m, "spec": {**m["spec"], "items": None}}):
        (out / "manifest.json").write_text(json.dumps(damaged))
        with pytest.raises(RenderError, match="is damaged"):
            store.load_manifest(out)  # was a KeyError from run and verify
        assert main(["verify", str(out)]) == 1  # README: verify exits 1 when something is wrong

    (out / "manifest.json").unlink()  # item files and no manifest: refused, unless forced
    with pytest.raises(RenderError, match="--force replaces the item files"):
        _render({**JOB, "items": 1}, out)
    r = _render({**JOB, "items": 1}, out, force=True)
    assert r.complete and sorted(items(out)) == [item_name(0)]


def test_a_model_in_training_mode_is_refused_and_the_callers_rng_left_alone(tmp_path):
    model = bundled.load_bundled().train()
    with pytest.raises(RenderError, match=r"model: .* training mode .* model.eval\(\)"):
        _render({"items": 1, "steps": 1, "model": "mine"}, tmp_path / "a", model=model)
    model.eval()
    sub = next(m for m in model.modules() if m is not model)
    sub.train()  # one submodule left in training mode is enough to change the bytes
    with pytest.raises(RenderError, match="training mode"):
        _render({"items": 1, "steps": 1, "model": "mine"}, tmp_path / "a", model=model)
    assert not (tmp_path / "a").exists()
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    _render({"items": 1, "steps": 1}, tmp_path / "b")  # loads the bundled model, whose init drew random numbers
    assert torch.equal(torch.rand(3), want)


def test_an_out_path_the_os_refuses_is_a_render_error(tmp_path, capsys):
    from jetdet.render import store

    long = tmp_path / ("x" * 300)
    assert main(["run", "--out", str(long), "--count", "1", "--steps", "1", "--no-progress"]) == 2
    assert main(["verify", str(long)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("out: ") >= 2, err

    def no_folder_open(path, flags, *a, **k):  # Windows: os.open refuses a folder
        if Path(path).is_dir():
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **k)

    real_open = store.os.open
    store.os.open = no_folder_open
    try:
        assert _render({"items": 1, "steps": 1}, tmp_path / "c").complete
    finally:
        store.os.open = real_open


# ------------------------------------------------------------------------------------- a user trial's cases


def test_a_second_job_on_a_folder_in_use_is_refused(ref, tmp_path):
    """A user trial ran a second job (--force, another seed) into the folder of a running one: both exited 0 with
    "done", and the folder held the second job's files under the first one's manifest. The running job now holds a
    lock on the folder (flock on the folder itself: no file, and it ends with the process however it ends), and a
    second job is refused with the folder unchanged. Here the test holds the lock as a running job would."""
    from jetdet.render import store

    out = _copy(ref, tmp_path / "job")
    before = snapshot(out)
    held = store.acquire_lock(out)
    if held is None:
        pytest.skip("no flock on this platform or file system")
    try:
        with pytest.raises(RenderError, match="another render job is writing in"):
            _render({**JOB, "seed": 1}, out, force=True)
        with pytest.raises(RenderError, match="another render job is writing in"):
            _render(JOB, out)  # the same job too: two writers of one folder
        assert snapshot(out) == before
    finally:
        store.release_lock(held)
    r = _render(JOB, out)  # the first job ended: the folder is free again, and the job is whole
    assert r.complete and r.kept == 12
    held = store.acquire_lock(out)  # and render() released its own lock
    store.release_lock(held)


def test_force_and_model_arguments_are_checked(tmp_path):
    """force='no' (a string from a config) replaced the folder's job: it was read as true. model='bundled' (the
    spec's name for it) failed with an AttributeError."""
    with pytest.raises(RenderError, match="force: expected True or False, got 'no'"):
        _render(JOB, tmp_path / "a", force="no")
    with pytest.raises(RenderError, match="model: expected the model object .*got str 'bundled'"):
        _render(JOB, tmp_path / "b", model="bundled")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_refused_list_job_names_the_item_that_changed(tmp_path):
    """A 12-item list with its last item changed was refused with the same cut-off JSON on both sides; the refusal
    now names the item and the key."""
    listed = [{"class": i % 4} for i in range(12)]
    _render({"items": listed, "steps": STEPS}, tmp_path / "job")
    changed = listed[:11] + [{"class": 3, "seed": 7}]
    with pytest.raises(RenderError, match=r'items\[11\]: \{"class": 3\} in the folder, \{"class": 3, "seed": 7\} now'):
        _render({"items": changed, "steps": STEPS}, tmp_path / "job")
    with pytest.raises(RenderError, match=r"items \(length\): 12 in the folder, 13 now"):
        _render({"items": listed + [{"class": 0}], "steps": STEPS}, tmp_path / "job")


def test_a_fast_job_resumed_with_other_batches_says_so(tmp_path, capsys):
    """In fast mode an item depends on the batch it was made in; a resume with another batch size gave a folder of
    mixed items, and nothing said so. The resume now warns, naming both compositions; deterministic mode does not
    (its items are the same bytes in any batch)."""
    spec = {"items": 6, "steps": 4, "mode": "fast", "budget": 0.5, "batch_size": 3}
    out = tmp_path / "fast"
    _render(spec, out)
    (out / item_name(5)).unlink()
    capsys.readouterr()
    _render({**spec, "batch_size": 1}, out, progress=True)
    err = capsys.readouterr().err
    assert "warning: 5 items kept were made with batch 3 x 1 worker(s), this run with batch 1 x 1 worker(s)" in err
    det = tmp_path / "det"
    _render({**spec, "mode": "deterministic", "budget": None}, det)
    (det / item_name(5)).unlink()
    _render({**spec, "mode": "deterministic", "budget": None, "batch_size": 1}, det, progress=True)
    assert "warning" not in capsys.readouterr().err


def test_sigterm_keeps_the_finished_items(tmp_path):
    """SIGTERM (a scheduler's pre-emption) killed the job without saving the manifest, so the items finished since
    the last save (here: all, with saves spaced 1000 s apart) were rendered again by the next run; Ctrl-C kept them.
    SIGTERM now stops the job as Ctrl-C does: exit 143, every finished item listed."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "job"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    cmd = [sys.executable, "-m", "jetdet.render", "run", "--out", str(out), "--count", "2000", "--steps", "2",
           "--batch-size", "1", "--threads", "1", "--manifest-every", "1000", "--no-progress"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 240
        while len(items(out) if out.exists() else {}) < 3 and time.monotonic() < end and p.poll() is None:
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "terminated; the items finished are listed in the manifest" in err
    listed = manifest(out)["items"]
    assert len(listed) >= 3 and {v["file"] for v in listed.values()} == set(items(out)), (len(listed), len(items(out)))


def test_a_full_disk_mid_job_is_one_line_and_the_same_command_resumes(tmp_path):
    """The folder stops taking files once the job renders (here a file size limit: EFBIG, as ENOSPC on a full
    disk): before, a raw OSError traceback (23 lines) naming only a temp file, or no file at all. Now one line naming
    the item file, exit 1, and the same command then finishes the job."""
    import os
    import resource
    import subprocess
    import sys

    out = tmp_path / "job"
    args = ["run", "--out", str(out), "--count", "2", "--steps", "1", "--threads", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    def limit():  # 8 KiB: the first manifest fits, an item file (12.5 KB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    p = subprocess.run([sys.executable, "-m", "jetdet.render", *args], env=env, capture_output=True, text=True,
                       timeout=300, preexec_fn=limit)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"error: File too large ({out / item_name(0)}); the job stopped" in p.stderr, p.stderr
    assert manifest(out)["items"] == {} and set(files(out)) == {"manifest.json", ".jetdet-run"}
    assert main(args) == 0 and len(manifest(out)["items"]) == 2


def test_render_in_a_group_the_user_made_without_master_variables(tmp_path, monkeypatch):
    """A user's own group made through ``file://`` (RANK and WORLD_SIZE in the environment, no MASTER_ADDR/PORT): the
    runner uses it as it is. A review found the check for hand-started workers refusing this case, which had worked."""
    import torch.distributed as dist

    for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # what the user's launcher left in the environment: not read now
        r = render({"items": 2, "steps": 1, "device": "cpu"}, tmp_path / "job", progress=False)
        assert r.complete and r.world_size == 1 and dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("redirect", ["2>&-", "2</dev/null"])
@pytest.mark.parametrize("args,code", [
    (["--count", "2", "--steps", "1", "--threads", "1"], 0),  # progress line, plan and summary on
    (["--count", "2", "--steps", "0", "--threads", "1"], 2),  # bad input: the error line has nowhere to go
])
def test_a_job_started_with_stderr_closed_runs_and_keeps_its_exit_status(tmp_path, args, code, redirect):
    """A job started with stderr closed (``2>&-``, a daemon: Python's sys.stderr is None) or not writable (fd 2 open
    for reading, as a launcher can leave it): the plan line's write raised (AttributeError, EBADF) before the first
    item, so the job stopped with nothing rendered (exit 1, the second time as if a write of its own had failed), and
    a bad argument's error line raised EBADF too (exit 1, not 2) (a review). Now a line that cannot be shown is
    dropped: the job renders, and the exit status says what happened."""
    import os
    import subprocess
    import sys

    out = tmp_path / "job"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    shell = f'exec "$0" -m jetdet.render run --out "$1" {" ".join(args)} {redirect}'
    p = subprocess.run(["/bin/sh", "-c", shell, sys.executable, str(out)], env=env, stdout=subprocess.PIPE, text=True,
                       timeout=300)
    assert p.returncode == code, p.stdout
    if code == 0:
        assert len(manifest(out)["items"]) == 2
