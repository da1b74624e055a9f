"""The other nodes, in-process: checksum and matcher, expert selector, multi-pass refiner, benchmark, the shapes
model nodes; and the node schemas (ids, category, tooltips)."""

from __future__ import annotations

import collections
import hashlib
import math
import sys
import time

import pytest
import torch
from conftest import require_comfyui

require_comfyui()
from _comfy_util import det_sample, empty_latent, with_call_log

import jetdet
from jetdet.comfy import NODE_IDS
from jetdet.comfy import nodes as N
from jetdet.comfy import shapes_model as sm


def test_schemas_ids_category_and_tooltips(comfy_dir):
    assert [c.define_schema().node_id for c in N.NODES] == list(NODE_IDS)
    for cls in N.NODES:
        s = cls.define_schema()
        assert s.category == "jetdet", s.node_id
        assert s.description, s.node_id
        for i in s.inputs or []:
            assert i.tooltip, f"{s.node_id}.{i.id} has no tooltip"
        s.finalize()
        s.validate()



def test_input_tooltips_name_only_inputs_the_node_has(comfy_dir):
    """An input's tooltip that names another jetdet input (a snake_case id such as ``batch_offset``) names one of its
    own node's inputs: the Benchmark's seed tooltip named a ``batch_offset`` it does not have (a review's find)."""
    import re

    schemas = [cls.define_schema() for cls in N.NODES]
    ids = {i.id for s in schemas for i in s.inputs or [] if "_" in i.id}
    bad = []
    for s in schemas:
        own = {i.id for i in s.inputs or []}
        for i in s.inputs or []:
            named = set(re.findall(r"[a-z0-9]+(?:_[a-z0-9]+)+", i.tooltip or "")) & ids
            bad += [f"{s.node_id}.{i.id} names {n}" for n in sorted(named - own)]
    assert not bad, bad

def test_checksum_node_matches_jetdet_checksum(comfy_dir):
    lat = {"samples": torch.randn(3, 4, 5, 5)}
    text = N.JetDetChecksum.execute(latent=lat).args[0]
    assert text.splitlines() == [f"item {i}: {jetdet.checksum(lat['samples'][i:i + 1])}" for i in range(3)]
    img = torch.rand(2, 6, 6, 3)
    assert N.JetDetChecksum.execute(image=img).args[0].splitlines()[1].endswith(jetdet.checksum(img[1:2]))
    with pytest.raises(ValueError, match="exactly one of latent or image"):
        N.JetDetChecksum.execute()


def test_matcher_against_checksums_latents_and_files(comfy_dir, tmp_path):
    from safetensors.torch import save_file

    lat = {"samples": torch.randn(2, 4, 6, 6)}
    sums = N.JetDetChecksum.execute(latent=lat).args[0]
    ok, report = N.JetDetOutputMatcher.execute(latent=lat, reference_checksums=sums).args
    assert ok and report.startswith("MATCH")
    moved = {"samples": lat["samples"].clone()}
    moved["samples"][1, 0, 0, 0] += 1e-7  # one element one ulp-ish off
    ok, report = N.JetDetOutputMatcher.execute(latent=moved, reference_checksums=sums).args
    assert not ok and "item 1: MISMATCH" in report and "item 0: match" in report
    ok, _ = N.JetDetOutputMatcher.execute(latent=moved, tolerance="1e-6", reference_latent=lat).args
    assert ok
    ok, _ = N.JetDetOutputMatcher.execute(latent=moved, tolerance="exact", reference_latent=lat).args
    assert not ok
    path = tmp_path / "ref.safetensors"
    save_file({"samples": lat["samples"]}, str(path))
    ok, report = N.JetDetOutputMatcher.execute(latent=lat, reference_file=str(path)).args
    assert ok and str(path) in report
    with pytest.raises(RuntimeError, match="does not match the reference"):
        N.JetDetOutputMatcher.execute(latent=moved, reference_file=str(path), stop_on_mismatch=True)
    with pytest.raises(FileNotFoundError, match="reference_file: no file at"):
        N.JetDetOutputMatcher.execute(latent=lat, reference_file=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="can only be matched exactly"):
        N.JetDetOutputMatcher.execute(latent=lat, tolerance="1e-4", reference_checksums=sums)
    with pytest.raises(ValueError, match="exactly one reference"):
        N.JetDetOutputMatcher.execute(latent=lat)


def test_matcher_reads_comfyuis_save_latent_files(comfy_dir, tmp_path):
    """The obvious way for an artist to keep a reference is ComfyUI's own Save Latent node: its file is matched bit
    for bit ('latent_tensor' as saved); one of ComfyUI's old format, which Load Latent rescales, is refused."""
    import folder_paths
    import nodes
    from safetensors.torch import save_file

    lat = {"samples": torch.randn(2, 4, 8, 8)}
    saved_dir = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        node = nodes.SaveLatent()
        ui = node.save(lat, filename_prefix="refs/run1")
    finally:
        folder_paths.set_output_directory(saved_dir)
    f = ui["ui"]["latents"][0]
    path = tmp_path / f["subfolder"] / f["filename"]
    ok, report = N.JetDetOutputMatcher.execute(latent=lat, reference_file=str(path)).args
    assert ok and report.startswith("MATCH"), report
    moved = {"samples": lat["samples"].clone()}
    moved["samples"][1, 2, 3, 4] += 1e-6
    ok, report = N.JetDetOutputMatcher.execute(latent=moved, reference_file=str(path)).args
    assert not ok and "item 1" in report, report
    with pytest.raises(ValueError, match="the reference is a latent, the input an image; compare like with like"):
        N.JetDetOutputMatcher.execute(image=torch.rand(1, 8, 8, 3), reference_file=str(path))
    old = tmp_path / "old.latent"
    save_file({"latent_tensor": lat["samples"]}, str(old))
    with pytest.raises(ValueError, match="reference_file: .* ComfyUI's old format"):
        N.JetDetOutputMatcher.execute(latent=lat, reference_file=str(old))


def test_structural_tolerance(comfy_dir):
    ref = torch.rand(1, 8, 8, 3)
    ok, _ = N.JetDetOutputMatcher.execute(image=ref + 0.001 * torch.randn_like(ref), tolerance="structural",
                                          reference_image=ref).args
    assert ok
    ok, _ = N.JetDetOutputMatcher.execute(image=torch.rand(1, 8, 8, 3), tolerance="structural",
                                          reference_image=ref).args
    assert not ok


def test_expert_selector_is_a_stable_sha256_choice(comfy_dir, shapes_patcher, shapes_conds):
    models = [object(), object(), object()]
    prompt = "a red circle on a blue background"
    want = int(hashlib.sha256(("text:" + prompt).encode()).hexdigest(), 16) % 3
    model, index = N.JetDetExpertSelector.execute(models[0], models[1], None, models[2], prompt=prompt).args
    assert index == [1, 2, 4][want] and model is models[want]
    # a pinned value: the choice must never change between versions or machines
    assert N.stable_index("text:a red circle on a blue background", 3) == want == 2
    m1, i1 = N.JetDetExpertSelector.execute(*models, conditioning=shapes_conds[0]).args
    m2, i2 = N.JetDetExpertSelector.execute(*models, conditioning=sm.class_conditioning(3)).args
    assert (m1, i1) == (m2, i2)
    picks = {N.JetDetExpertSelector.execute(*models, conditioning=sm.class_conditioning(c)).args[1]
             for c in range(10)}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="give a prompt text or connect a conditioning"):
        N.JetDetExpertSelector.execute(*models)
    # an area, a strength or a timestep range gives another image: another checksum (a trial found them hashed
    # alike); a ControlNet-like object in the dict is left out (its repr holds an address)
    import nodes

    base = N.conditioning_checksum(shapes_conds[0])
    variants = [nodes.ConditioningSetArea().append(shapes_conds[0], 64, 64, 0, 0, 1.0)[0],
                nodes.ConditioningSetAreaStrength().append(shapes_conds[0], 3.0)[0],
                nodes.ConditioningSetTimestepRange().set_range(shapes_conds[0], 0.0, 0.5)[0]]
    sums = {N.conditioning_checksum(v) for v in variants}
    assert base not in sums and len(sums) == 3
    with_object = [[shapes_conds[0][0][0], dict(shapes_conds[0][0][1], control=object())]]
    assert N.conditioning_checksum(with_object) == N.conditioning_checksum(with_object) == base


def test_multipass_rerunning_one_pass_alone_is_bit_exact(shapes_patcher, shapes_conds):
    args = dict(model=shapes_patcher, seed=11, steps=4, cfg=4.0, sampler_name="euler_ancestral", scheduler="simple",
                positive=shapes_conds[0], negative=shapes_conds[1], coarse_denoise=1.0, refine_denoise=0.6,
                detail_denoise=0.3, batch_offset=0)
    full, report = N.JetDetMultiPassRefiner.execute(latent_image=empty_latent(2), start_pass="coarse",
                                                    end_pass="detail", **args).args
    coarse, _ = N.JetDetMultiPassRefiner.execute(latent_image=empty_latent(2), start_pass="coarse", end_pass="coarse",
                                                 **args).args
    refine, _ = N.JetDetMultiPassRefiner.execute(latent_image=coarse, start_pass="refine", end_pass="refine",
                                                 **args).args
    detail, rep = N.JetDetMultiPassRefiner.execute(latent_image=refine, start_pass="detail", end_pass="detail",
                                                   **args).args
    assert torch.equal(detail["samples"], full["samples"])
    assert rep.splitlines()[1:] == report.splitlines()[-2:]  # the detail pass's item checksums
    seeds = {line.split(",")[0] for line in report.splitlines() if not line.startswith(" ")}
    assert len(seeds) == 3  # three different pass seeds
    assert not torch.equal(coarse["samples"], refine["samples"])
    with pytest.raises(ValueError, match="comes before start_pass"):
        N.JetDetMultiPassRefiner.execute(latent_image=coarse, start_pass="detail", end_pass="coarse", **args)


def test_benchmark_table_and_plot(shapes_patcher, shapes_conds):
    table, plot = N.JetDetBenchmark.execute(shapes_patcher, 2, 6, 4.0, "euler", "simple", *shapes_conds,
                                            empty_latent(2), 1.0, "0, 0.3").args
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["off", "fast", "fast", "deterministic"]
    assert lines[-1].startswith("wall s: one run per setting")  # the caveat of one timing
    off, fast0, fast3 = lines[1].split(), lines[2].split(), lines[3].split()
    # columns: run (one or two words), wall, speed-up, fewer calls, model calls, rows, PSNR, checksums
    assert off[3] == "1.00x" and off[4] == "6"
    assert fast0[5] == "6" and fast0[7] == "inf"  # budget 0: every call, identical output
    assert fast0[8:] == off[7:]
    assert int(fast3[5]) < 6 and fast3[4] == f"{6 / int(fast3[5]):.2f}x"  # budget 0.3 skipped calls
    assert plot.dim() == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= plot.min() <= plot.max() <= 1
    with pytest.raises(ValueError, match="fast_budgets"):
        N.JetDetBenchmark.execute(shapes_patcher, 2, 2, 4.0, "euler", "simple", *shapes_conds, empty_latent(1),
                                  1.0, "fast")


def test_benchmark_repeats_interleaved_runs_and_says_so(shapes_patcher, shapes_conds, monkeypatch):
    """An acceptance run saw one timing per setting read as 8.6x on a busy machine: ``repeats`` times every setting
    that many times, interleaved, and the table gives the median; calls, PSNR and checksums are the first round's
    (every round gives the same bits). An empty ``fast_budgets`` is said in the table."""
    order = []
    sample = N.smp.sample
    monkeypatch.setattr(N.smp, "sample", lambda m, *a, **kw: order.append(a[1]) or sample(m, *a, **kw))
    one = N.JetDetBenchmark.execute(shapes_patcher, 2, 3, 4.0, "euler", "simple", *shapes_conds, empty_latent(1),
                                    1.0, "0.3").args[0].splitlines()
    order.clear()
    three = N.JetDetBenchmark.execute(shapes_patcher, 2, 3, 4.0, "euler", "simple", *shapes_conds, empty_latent(1),
                                      1.0, "0.3", 3).args[0].splitlines()
    # warm-ups (the fast setting with all its steps), then three rounds of (off, fast 0.3, deterministic)
    assert order == [2, 3, 2] + [3, 3, 3] * 3
    assert three[-1] == "wall s: the median of 3 interleaved runs per setting"
    for a, b in zip(one[1:-1], three[1:-1]):
        assert a.split()[-5:] == b.split()[-5:]  # calls, rows, PSNR, checksum: the same; only the timings differ
    empty = N.JetDetBenchmark.execute(shapes_patcher, 2, 2, 4.0, "euler", "simple", *shapes_conds, empty_latent(1),
                                      1.0, " ").args[0].splitlines()
    assert [line.split()[0] for line in empty[1:-1]] == ["off", "deterministic"]
    assert empty[-1].endswith("No fast budgets given (fast_budgets is empty)")


def test_fast_optimizer_refuses_guards_past_the_schedule_when_queued():
    v = N.JetDetFastOptimizer.validate_inputs
    assert v(forecast="order1", linear_attention="off", start_percent=0.3, end_percent=0.5) is True
    assert v(start_percent=0.7, end_percent=0.6) == "start_percent + end_percent: expected at most 1, got 0.7 + 0.6"
    assert v(start_percent=1.2) == "start_percent: expected a value in [0, 0.99], got 1.2"  # ComfyUI's check is off
    assert v(start_percent=None, end_percent=0.9) is True  # a linked input: checked when the node runs
    assert "forecast" in v(forecast="order3")


def test_benchmark_stops_at_cancel_within_a_step(shapes_patcher, shapes_conds):
    """ComfyUI's Cancel sets a flag that the samplers' step callback checks; the Benchmark ran without one, so an
    acceptance run saw it go on for 15-23 s after Cancel. Cancel during the first run's 5th model call: the next
    step stops it, and no later run starts."""
    import comfy.model_management as mm

    logged, log = with_call_log(shapes_patcher)
    steps = 30

    class CancelAt:
        def __call__(self, executor, *args, **kwargs):
            if len(log.sizes) == 5:
                mm.interrupt_current_processing(True)
            return executor(*args, **kwargs)

    import comfy.patcher_extension as pe

    logged.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.cancel", CancelAt())
    try:
        with pytest.raises(mm.InterruptProcessingException):
            N.JetDetBenchmark.execute(logged, 2, steps, 4.0, "euler", "simple", *shapes_conds, empty_latent(1),
                                      1.0, "0.1")
    finally:
        mm.interrupt_current_processing(False)
    assert 5 <= len(log.sizes) <= 6, len(log.sizes)  # one step's call at most after the flag, of 3 x (2 + 30) calls


def test_a_fast_model_given_to_the_deterministic_sampler_is_named_in_the_log(shapes_patcher, shapes_conds, caplog):
    """The sampler runs every call deterministically, so fast mode has no effect there: the log says so (before, the
    artist's fast setting vanished without a word)."""
    fast = N.JetDetModeSwitch.execute(shapes_patcher, "fast", 0.1, True).args[0]
    with caplog.at_level("WARNING"):
        N.JetDetDeterministicSampler.execute(fast, 1, 2, 4.0, "euler", "simple", *shapes_conds, empty_latent(1), 1.0,
                                             0)
    assert "is in fast mode" in caplog.text and "fast mode has no effect here" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        N.JetDetDeterministicSampler.execute(shapes_patcher, 1, 2, 4.0, "euler", "simple", *shapes_conds,
                                             empty_latent(1), 1.0, 0)
    assert "fast mode" not in caplog.text


def test_shapes_nodes(shapes_patcher, comfy_dir):
    pos, neg = N.JetDetClassConditioning.execute(7).args
    assert pos[0][0].shape == (1, 1, 16) and pos[0][0][0, 0, 7] == 1 and pos[0][1]["pooled_output"][0, 7] == 1
    assert neg[0][0].abs().sum() == 0 and neg[0][1]["pooled_output"].abs().sum() == 0
    with pytest.raises(ValueError, match="class_index"):
        N.JetDetClassConditioning.execute(10)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = {"samples": sm.image_to_latent(img)}
    out = N.JetDetShapesDecode.execute(lat, 2).args[0]
    assert out.shape == (2, 64, 64, 3)
    assert torch.allclose(out[:, ::2, ::2], sm.to_comfy_image(img), atol=1e-6)
    model = N.JetDetShapesModelLoader.execute().args[0]
    assert type(model.model).__name__ == "SD3"
    assert det_sample(model, pos, neg, 1, steps=2)[0].shape == (1, 16, 32, 32)


def test_plot_without_matplotlib_falls_back_to_pil(comfy_dir, monkeypatch, caplog):
    points = [{"label": "off", "speedup": 1.0, "psnr": math.inf}, {"label": "fast 0.1", "speedup": 2.1, "psnr": 35.0}]
    with_mpl = N._plot(points)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(N, "_warned_plot", False)
    with caplog.at_level("WARNING"):
        img = N._plot(points)
        N._plot(points)
    assert img.shape[0] == 1 and img.shape[-1] == 3 and img.min() < 0.5 < img.max()
    assert not torch.equal(img, with_mpl)  # the PIL drawing, not matplotlib's
    assert sum("matplotlib is not installed" in r.message for r in caplog.records) == 1


def test_sampling_nodes_report_progress_through_comfyuis_progress_bar(shapes_patcher, shapes_conds):
    import comfy.utils

    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        det_sample(shapes_patcher, *shapes_conds, 1, steps=3)
        assert seen[-1] == (3, 3) and [v for v, _ in seen] == [1, 2, 3]
        seen.clear()
        N.JetDetBenchmark.execute(shapes_patcher, 2, 2, 4.0, "euler", "simple", *shapes_conds, empty_latent(1), 1.0,
                                  "0.1")
        # per step: off, one fast budget and deterministic, each a 2-step warm-up and a 2-step timed run
        assert [v for v, _ in seen] == list(range(1, 13)) and seen[-1] == (12, 12)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)


# ------------------------------------------------------------------------------------------- checksum labels


def test_matcher_compares_each_item_with_the_line_labelled_with_its_id(shapes_patcher, shapes_conds):
    batch, batch_sums = det_sample(shapes_patcher, *shapes_conds, 2, steps=2, seed=3)
    one, one_sums = det_sample(shapes_patcher, *shapes_conds, 1, steps=2, seed=3, offset=1)
    assert one_sums.startswith("item 1: ") and one_sums in batch_sums.splitlines()

    def check(samples, ref, **kw):
        return N.JetDetOutputMatcher.execute(latent={"samples": samples}, reference_checksums=ref, **kw).args

    # the batch-1 run of item 1 against the batch's checksums: compared with the line labelled 1
    ok, report = check(one, batch_sums, batch_offset=1)
    assert ok and "item 1: match" in report and "not in the input (not compared): 0" in report
    ok, report = check(one, batch_sums)  # batch_offset 0: it is item 0, which it is not
    assert not ok and "item 0: MISMATCH" in report and "it is the reference's item 1" in report
    # the order of the lines does not matter, the labels do
    ok, _ = check(batch, "\n".join(reversed(batch_sums.splitlines())))
    assert ok
    # a line labelled with the wrong item is not accepted
    ok, report = check(one, one_sums.replace("item 1", "item 0"), batch_offset=1)
    assert not ok and "no reference checksum for item 1" in report
    # bare digests are items 0, 1, ... in line order
    bare = "\n".join(line.split(": ")[1] for line in batch_sums.splitlines())
    assert check(batch, bare)[0] and not check(batch, "\n".join(reversed(bare.splitlines())))[0]
    assert check(one, bare, batch_offset=1)[0]
    with pytest.raises(ValueError, match="reference_checksums: line 2 mixes"):
        check(batch, batch_sums.splitlines()[0] + "\n" + bare.splitlines()[1])
    # ids that repeat (Latent Batch of two batches: batch_index [0, 1, 0, 1]): the sampler's own labels are accepted
    # (they were refused as "item 0 is given twice"), the k-th row of an id against the k-th line of it
    twice = torch.cat([batch, batch.flip(0)])
    ids = [0, 1, 0, 1]
    sums = "\n".join(f"item {i}: {jetdet.checksum(twice[r:r + 1])}" for r, i in enumerate(ids))
    ok, report = N.JetDetOutputMatcher.execute(latent={"samples": twice, "batch_index": ids},
                                               reference_checksums=sums).args
    assert ok and "line 2 of 2 for item 0" in report and report.startswith("MATCH exact against 4 checksums"), report
    ok, report = N.JetDetOutputMatcher.execute(latent={"samples": twice[[2, 1, 0, 3]], "batch_index": ids},
                                               reference_checksums=sums).args
    assert not ok and "item 0: MISMATCH" in report  # the two rows of item 0 swapped
    assert "its rows are in another order" in report and "more times" not in report, report
    # the input repeats items the reference holds once (Latent Batch of a batch with itself, a user trial): the rows
    # past the reference's lines are named as repeats, not blamed on batch_offset (item 0 "is the reference's item 0")
    ok, report = N.JetDetOutputMatcher.execute(latent={"samples": torch.cat([batch, batch]), "batch_index": ids},
                                               reference_checksums=batch_sums).args
    assert not ok and "the same bits as the reference's item 0: the input holds item 0 more times" in report, report
    assert "batch_offset right" not in report


def test_matcher_compares_a_sub_batch_with_its_rows_of_a_larger_reference(shapes_patcher, shapes_conds, tmp_path):
    """Row r of the input is item batch_offset + r for reference_latent, reference_image and reference_file as for
    checksums: an item sampled alone (batch_offset 2) against the batch of 4's latent, image or Save Latent file is
    compared with the reference's row 2 (a user trial got 'MISMATCH exact: shape (1, ...) vs (4, ...)' though the
    bits were equal). An item the reference does not hold is a mismatch naming batch_offset and both row counts."""
    import folder_paths
    import nodes

    batch, _ = det_sample(shapes_patcher, *shapes_conds, 4, steps=2, seed=8)
    one, _ = det_sample(shapes_patcher, *shapes_conds, 1, steps=2, seed=8, offset=2)
    assert torch.equal(one[0], batch[2])
    saved_dir = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        f = nodes.SaveLatent().save({"samples": batch}, filename_prefix="refs/batch")["ui"]["latents"][0]
    finally:
        folder_paths.set_output_directory(saved_dir)
    path = str(tmp_path / f["subfolder"] / f["filename"])

    def check(samples, offset, **ref):
        return N.JetDetOutputMatcher.execute(latent={"samples": samples}, batch_offset=offset, **ref).args

    for ref in ({"reference_latent": {"samples": batch}}, {"reference_file": path}):
        ok, report = check(one, 2, **ref)
        assert ok and report.startswith("MATCH exact"), report
        assert "item 2: match (reference row 2)" in report and "reference rows not compared: 0, 1, 3" in report
        assert "against reference row 2 of 4" in report, report
        ok, report = check(one, 1, **ref)  # the wrong id: compared with row 1, which it is not
        assert not ok and "item 1: MISMATCH (reference row 1)" in report, report
        ok, report = check(batch[2:], 2, **ref)  # items 2, 3 of a batch of 4
        assert ok and "reference rows not compared: 0, 1" in report, report
        ok, report = check(batch[2:], 3, **ref)  # items 3, 4: item 4 is past the reference's rows
        assert not ok and "batch_offset 3 makes the input's 2 rows items 3, 4" in report, report
        assert "the reference's 4 rows hold items 0 to 3" in report, report
        assert "not item 4: is batch_offset right?" in report, report
        assert "item 3: MISMATCH (reference row 3)" in report, report
    # an image, and a latent from Latent From Batch (batch_index [2], batch_offset 0): the same rule
    img = torch.rand(4, 8, 8, 3)
    assert N.JetDetOutputMatcher.execute(image=img[1:2], batch_offset=1, reference_image=img).args[0]
    assert not N.JetDetOutputMatcher.execute(image=img[1:2], batch_offset=0, reference_image=img).args[0]
    ok, report = N.JetDetOutputMatcher.execute(latent={"samples": one, "batch_index": [2]},
                                               reference_latent={"samples": batch}).args
    assert ok and "item 2: match (reference row 2)" in report, report
    # a reference latent with a batch_index holds those items: items 2, 3 of the batch, item 3 against its row 1
    ok, report = check(batch[3:], 3, reference_latent={"samples": batch[2:], "batch_index": [2, 3]})
    assert ok and "item 3: match (reference row 1)" in report, report
    # as many rows as the input: the same items, row against row (batch_offset only labels them)
    ok, report = check(one, 2, reference_latent={"samples": batch[2:3]})
    assert ok and "item 2: match" in report, report
    # fewer rows than the input: a shape mismatch that says why
    ok, report = check(batch, 0, reference_latent={"samples": one})
    assert not ok and "the input has 4 rows, the reference 1" in report, report

def test_item_checksums_are_the_readmes_format_recomputed_from_saved_bytes(shapes_patcher, shapes_conds, tmp_path):
    """The README documents the checksum's exact format (it said "one SHA-256 per item", and sha256 of an item's raw
    bytes does not give it: a user trial). Each item's checksum of the Deterministic Sampler (float32) and of jetdet
    Checksum (a bfloat16 latent) is recomputed here with hashlib alone, filling in the header template the README
    gives, from the bytes of the file ComfyUI's Save Latent wrote (read without torch). Negative controls: without
    the README's template the test fails at its first assert; the SHA-256 of the bytes alone differs."""
    import json
    import re
    from pathlib import Path

    import folder_paths
    import nodes

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    templates = set(re.findall(r"`(jetdet\.checksum\.v1\|<dtype>\|<shape>\|)`", readme))
    assert templates == {"jetdet.checksum.v1|<dtype>|<shape>|"}, templates
    template = templates.pop()
    batch, sampler_sums = det_sample(shapes_patcher, *shapes_conds, 3, steps=1, seed=5)
    half = {"samples": batch.to(torch.bfloat16)}
    cases = [(batch, sampler_sums), (half["samples"], N.JetDetChecksum.execute(latent=half).args[0])]
    names = {"F32": "float32", "BF16": "bfloat16"}
    saved_dir = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        for k, (samples, sums) in enumerate(cases):
            f = nodes.SaveLatent().save({"samples": samples}, filename_prefix=f"sums/{k}")["ui"]["latents"][0]
            raw = (tmp_path / f["subfolder"] / f["filename"]).read_bytes()
            n = int.from_bytes(raw[:8], "little")
            info = json.loads(raw[8:8 + n])["latent_tensor"]
            start, end = info["data_offsets"]
            data, shape = raw[8 + n + start:8 + n + end], info["shape"]
            size = len(data) // shape[0]
            head = template.replace("<dtype>", names[info["dtype"]]).replace("<shape>", repr(tuple([1] + shape[1:])))
            want = [f"item {r}: {hashlib.sha256(head.encode() + data[r * size:(r + 1) * size]).hexdigest()}"
                    for r in range(shape[0])]
            assert sums.splitlines() == want, (k, head)
            assert hashlib.sha256(data[:size]).hexdigest() not in sums  # the bytes alone: another digest
    finally:
        folder_paths.set_output_directory(saved_dir)

def test_matcher_an_input_with_no_rows_is_a_mismatch(comfy_dir):
    """An input with 0 rows (or no elements) against a reference latent, image or file has no items to compare: a
    MISMATCH saying so, as against checksums, and stop_on_mismatch stops. Negative control: before, 0 rows against a
    batch of 4 was 'MATCH exact: 0 of 0 differ' (the by-item branch picked no rows) and stop_on_mismatch let it
    through; 0 rows against 0 rows was a MATCH too."""
    img = torch.rand(4, 8, 8, 3)
    lat = torch.randn(4, 4, 8, 8)
    for kw in ({"image": img[:0], "reference_image": img}, {"image": img[:0], "reference_image": img[:0]},
               {"latent": {"samples": lat[:0]}, "reference_latent": {"samples": lat}},
               {"image": img[:, :0], "reference_image": img[:, :0]}):
        for tol in ("exact", "1e-4", "structural"):
            ok, report = N.JetDetOutputMatcher.execute(tolerance=tol, **kw).args
            assert not ok and report.startswith(f"MISMATCH {tol}: no items to compare: the input has "), report
            with pytest.raises(RuntimeError, match="no items to compare"):
                N.JetDetOutputMatcher.execute(tolerance=tol, stop_on_mismatch=True, **kw)
    ok, report = N.JetDetOutputMatcher.execute(image=img[:0], reference_image=img).args
    assert report == ("MISMATCH exact: no items to compare: the input has 0 rows (shape (0, 8, 8, 3)), the "
                      "reference 4 rows (reference: reference_image)"), report
    ok, report = N.JetDetOutputMatcher.execute(image=img[:0], reference_checksums=N.JetDetChecksum.execute(
        image=img).args[0]).args
    assert not ok and "no items to compare" in report, report  # as it was against checksums


def test_checksum_labels_follow_the_samplers_item_ids(comfy_dir):
    lat = {"samples": torch.randn(2, 4, 5, 5), "batch_index": [3, 5]}
    text = N.JetDetChecksum.execute(latent=lat).args[0]
    assert [line.split(":")[0] for line in text.splitlines()] == ["item 3", "item 5"]
    text = N.JetDetChecksum.execute(latent={"samples": lat["samples"]}, batch_offset=7).args[0]
    assert [line.split(":")[0] for line in text.splitlines()] == ["item 7", "item 8"]
    ok, _ = N.JetDetOutputMatcher.execute(latent={"samples": lat["samples"]}, reference_checksums=text,
                                          batch_offset=7).args
    assert ok


def test_batch_offset_past_the_item_id_range_names_batch_offset(shapes_patcher, shapes_conds):
    top = 2**64 - 1
    with pytest.raises(ValueError, match=r"^batch_offset: .*largest batch_offset for this batch: "
                                         f"{top - 1}") as e:
        det_sample(shapes_patcher, *shapes_conds, 2, steps=1, offset=top)
    assert "item_offset" not in str(e.value)
    _, sums = det_sample(shapes_patcher, *shapes_conds, 2, steps=1, offset=top - 1)  # the largest that fits
    assert sums.splitlines()[1].startswith(f"item {top}: ")
    with pytest.raises(ValueError, match="^batch_offset: "):
        N.JetDetMultiPassRefiner.execute(shapes_patcher, 1, 1, 4.0, "euler", "simple", *shapes_conds,
                                         empty_latent(2), 1.0, 0.5, 0.25, "coarse", "coarse", top)


def test_structural_tolerance_is_strict_about_dtype_and_says_so(comfy_dir):
    ref = torch.rand(1, 8, 8, 3).half().float()  # values a float16 holds exactly
    half = ref.half()
    assert N.JetDetOutputMatcher.execute(image=half, tolerance="1e-4", reference_image=ref).args[0]
    assert N.JetDetOutputMatcher.execute(image=half, tolerance="structural", reference_image=ref).args[0] is False
    assert N.JetDetOutputMatcher.execute(image=half.float(), tolerance="structural", reference_image=ref).args[0]
    tip = next(i for i in N.JetDetOutputMatcher.define_schema().inputs if i.id == "tolerance").tooltip
    assert "structural: the same dtype" in tip and "stricter than 1e-4 about dtype" in tip


# --------------------------------------------------------------------------------- strict from the Mode Switch


def test_sampling_nodes_keep_the_mode_switchs_strict_setting(shapes_patcher, shapes_conds):
    seen = []
    hook = shapes_patcher.model.diffusion_model.register_forward_pre_hook(
        lambda mod, a: seen.append((torch.are_deterministic_algorithms_enabled(),
                                    torch.is_deterministic_algorithms_warn_only_enabled())))
    ks = dict(seed=1, steps=1, cfg=4.0, sampler_name="euler", scheduler="simple", positive=shapes_conds[0],
              negative=shapes_conds[1])
    try:
        for strict in (False, True):
            m = N.JetDetModeSwitch.execute(shapes_patcher, "deterministic", 0.05, strict).args[0]
            seen.clear()
            N.JetDetDeterministicSampler.execute(m, **ks, latent_image=empty_latent(1), denoise=1.0, batch_offset=0)
            assert set(seen) == {(True, not strict)}, (strict, seen)
            seen.clear()
            N.JetDetMultiPassRefiner.execute(m, **ks, latent_image=empty_latent(1), coarse_denoise=1.0,
                                             refine_denoise=0.5, detail_denoise=0.25, start_pass="coarse",
                                             end_pass="coarse", batch_offset=0)
            assert set(seen) == {(True, not strict)}, (strict, seen)
            seen.clear()
            N.JetDetBenchmark.execute(m, **ks, latent_image=empty_latent(1), denoise=1.0, fast_budgets="0.1")
            assert (True, not strict) in seen and (True, strict) not in seen, (strict, seen)
        seen.clear()  # no Mode Switch: strict
        N.JetDetDeterministicSampler.execute(shapes_patcher, **ks, latent_image=empty_latent(1), denoise=1.0,
                                             batch_offset=0)
        assert set(seen) == {(True, False)}
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------------- benchmark timing


def test_benchmark_times_every_setting_warm(shapes_patcher, shapes_conds, monkeypatch):
    import comfy.model_management as mm

    cold = 6.0  # a timed row holds 2 steps of the shapes model: well under this on a loaded 2-core machine (3.8 s seen)
    load, loads = mm.load_models_gpu, []

    def slow_first_load(*a, **kw):  # a model that is not loaded yet: the first sampling call pays for it
        if not loads:
            time.sleep(cold)
        loads.append(1)
        return load(*a, **kw)

    monkeypatch.setattr(mm, "load_models_gpu", slow_first_load)
    table, _ = N.JetDetBenchmark.execute(shapes_patcher, 2, 2, 4.0, "euler", "simple", *shapes_conds,
                                         empty_latent(1), 1.0, "0.1").args
    walls = {line.split()[0]: float(line.split()[-7]) for line in table.splitlines()[1:-1]}
    assert loads and all(w < cold for w in walls.values()), table


def test_benchmark_warm_up_launches_the_step_caches_kernels(shapes_patcher, shapes_conds, monkeypatch):
    """The step cache launches its own kernels (forecast, relative change: compiled at their first launch on a GPU)
    only after a few model calls, so a two-step warm-up never reached them and their compile landed in the first timed
    fast run. The fast setting with the largest budget now warms up with all its steps: by the first timed run
    both have run."""
    from jetdet.comfy import wrappers as wr
    from jetdet.ops import registry

    counts = collections.Counter()
    for name in ("forecast", "relative_change"):
        body = registry.OPS[name]._body
        monkeypatch.setattr(registry.OPS[name], "_body", lambda *a, _b=body, _n=name: counts.update([_n]) or _b(*a))
    at_first_timed_run = []
    with_counter = wr.with_counter
    monkeypatch.setattr(wr, "with_counter", lambda m: at_first_timed_run.append(dict(counts)) or with_counter(m))
    N.JetDetBenchmark.execute(shapes_patcher, 2, 12, 4.0, "euler", "simple", *shapes_conds, empty_latent(1), 1.0,
                              "0, 0.1")  # budget 0 first: it never forecasts, so the warm-up must run 0.1's setting
    assert counts["forecast"] and counts["relative_change"]  # the timed fast run uses them
    assert at_first_timed_run[0].get("forecast") and at_first_timed_run[0].get("relative_change"), at_first_timed_run


def test_benchmark_schema_says_what_it_does(shapes_patcher, shapes_conds):
    """The page's texts were wrong in two places: the description said every setting warms up with 2 steps (the
    largest budget's fast setting runs all its steps, above), and the seed's tooltip that item i's noise depends on
    (seed, i, step), where a latent from ComfyUI's batch nodes gives its batch_index instead (as here: item 1 alone
    by its batch_index is row 1 of the batch in the deterministic run; the off run is not batch invariant)."""
    schema = N.JetDetBenchmark.define_schema()
    assert "largest budget all its steps" in schema.description, schema.description
    seed = next(i for i in schema.inputs if i.id == "seed")
    assert "batch_index[i]" in seed.tooltip, seed.tooltip

    def det_sums(latent):
        table = N.JetDetBenchmark.execute(shapes_patcher, 2, 2, 4.0, "euler", "simple", *shapes_conds, latent, 1.0,
                                          "").args[0]
        row = table.splitlines()[2].split()
        assert row[0] == "deterministic", table
        return row[7:]

    assert det_sums(dict(empty_latent(1), batch_index=[1])) == det_sums(empty_latent(2))[1:]


def _dot_heights(img: torch.Tensor) -> list[float]:
    """Mean pixel row of the PIL plot's blue dots, left to right (one dot per column band)."""
    blue = torch.tensor([31, 119, 180], dtype=torch.float32) / 255.0
    mask = (img[0] - blue).abs().max(-1).values < 1e-3
    ys, xs = mask.nonzero(as_tuple=True)
    dots, order = [], xs.argsort()
    ys, xs = ys[order], xs[order]
    start = 0
    for k in range(1, len(xs) + 1):
        if k == len(xs) or xs[k] - xs[k - 1] > 3:
            dots.append(ys[start:k].float().mean().item())
            start = k
    return dots


def test_plot_draws_bit_identical_runs_above_every_finite_psnr(comfy_dir, monkeypatch):
    points = [{"label": "off", "speedup": 1.0, "psnr": math.inf},
              {"label": "deterministic", "speedup": 2.0, "psnr": 137.0},
              {"label": "fast 0.1", "speedup": 3.0, "psnr": 30.0}]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the PIL drawing: its dots can be found by colour
    monkeypatch.setattr(N, "_warned_plot", True)
    off, det, fast = _dot_heights(N._plot(points))
    assert off < det < fast  # pixel rows grow downwards: inf on top, then 137 dB, then 30 dB
    ys, top = N._plot_ys(points)
    assert top > 137 and ys == [top, 137.0, 30.0]
    assert N._plot_ys(points[:1] + points[2:])[1] == 100.0  # "inf drawn at 100" while every PSNR is below 90


# ------------------------------------------------------------------------------------- files that are not ours


def test_files_of_the_wrong_kind_are_clear_errors_naming_the_input(comfy_dir, tmp_path):
    text = tmp_path / "hostname"
    text.write_text("somehost\n")
    lat = {"samples": torch.zeros(1, 4, 4, 4)}
    with pytest.raises(ValueError, match=f"reference_file: {text} is not a readable safetensors file"):
        N.JetDetOutputMatcher.execute(latent=lat, reference_file=str(text))
    with pytest.raises(ValueError, match=f"path: {text} is not a readable weights file \\(not safetensors"):
        N.JetDetShapesModelLoader.execute(str(text))
    import tiny_models
    from safetensors.torch import save_file

    sd15 = tmp_path / "sd15.safetensors"
    save_file(tiny_models.sd15_state_dict(0), str(sd15))
    with pytest.raises(ValueError, match=f"path: {sd15} is not jetdet's shapes model: ComfyUI detects it as SD15, "
                                         "in_channels 4"):
        N.JetDetShapesModelLoader.execute(str(sd15))
    # a folder (a user trial got "no shapes model at <folder>"): says it is a folder, not a file
    with pytest.raises(IsADirectoryError, match=f"^path: {tmp_path} is a folder, not a file"):
        N.JetDetShapesModelLoader.execute(str(tmp_path))


def test_shapes_loader_finds_a_relative_path_in_diffusion_models_and_names_where_it_looked(comfy_dir, tmp_path,
                                                                                          monkeypatch):
    """A user trial over the HTTP server: the README has the shapes model copied into ``models/diffusion_models/``
    for Load Diffusion Model; its name typed into the loader's ``path`` was looked up relative to the folder the
    server process was started in (invisible in the page), and the error repeated the name as typed: "path: no
    shapes model at comfy_shapes_sd3.safetensors"."""
    import shutil

    import folder_paths

    models = tmp_path / "diffusion_models"
    (models / "sub").mkdir(parents=True)
    shutil.copy(sm.MODEL_FILE, models / "sub" / "shapes_copy.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(models)], {".safetensors"}))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # a name in ComfyUI's diffusion_models folder loads, as Load Diffusion Model lists it (sub/...)
    model = N.JetDetShapesModelLoader.execute("sub/shapes_copy.safetensors").args[0]
    assert type(model.model).__name__ == "SD3"
    # a relative path that exists from the process's folder keeps loading as before
    shutil.copy(sm.MODEL_FILE, elsewhere / "here.safetensors")
    assert type(N.JetDetShapesModelLoader.execute("here.safetensors").args[0].model).__name__ == "SD3"
    # found nowhere: the error names every absolute place it looked
    with pytest.raises(FileNotFoundError) as e:
        N.JetDetShapesModelLoader.execute("missing.safetensors")
    msg = str(e.value)
    assert msg.startswith("path: no shapes model 'missing.safetensors'"), msg
    assert str(models / "missing.safetensors") in msg and str(elsewhere / "missing.safetensors") in msg, msg
    # an absolute path is taken as it is
    with pytest.raises(FileNotFoundError, match=f"^path: no shapes model at {tmp_path / 'nope.safetensors'} "):
        N.JetDetShapesModelLoader.execute(str(tmp_path / "nope.safetensors"))


def test_a_conditioning_of_another_width_is_an_error_naming_the_conditionings(shapes_patcher, shapes_conds):
    """A user trial over the HTTP server: a conditioning whose tokens are wider than the model's text input (a text
    encoder of another model family; here 24 wide into the shapes model's 16) stopped the Deterministic Sampler with
    jetdet's linear's own check, "weight: expected shape (N, 24) to match input's last dim, got (128, 16)", read in
    the page as the name of an input the node does not have (ComfyUI's KSampler: "mat1 and mat2 shapes cannot be
    multiplied"). Now the error names the conditionings and both widths, chained from the model's own."""
    import comfy.sample

    from jetdet.comfy import wrappers as wr

    pos, neg = shapes_conds
    wide = [[torch.randn(1, 1, 24), dict(pos[0][1])]]
    for p_, n_ in ((wide, neg), (pos, [[torch.zeros(1, 1, 24), dict(neg[0][1])]])):
        with pytest.raises(ValueError) as e:
            det_sample(shapes_patcher, p_, n_, 1, steps=1)
        msg = str(e.value)
        assert msg.startswith("positive, negative: the conditioning's text tokens are 24 wide"), msg
        assert "the model takes 16" in msg and "weight: expected shape (N, 24)" in msg, msg
        assert e.value.__cause__ is not None
    # ComfyUI's own KSampler with a model in deterministic mode: the same error
    det = wr.with_deterministic(shapes_patcher)
    lat = empty_latent(1)["samples"]
    with pytest.raises(ValueError, match="^positive, negative: the conditioning's text tokens are 24 wide"):
        comfy.sample.sample(det, torch.zeros_like(lat), 1, 4.0, "euler", "simple", wide, neg, lat)
    # the conditionings of the model's width: another error in the model is left as it is
    with pytest.raises(Exception) as e:
        comfy.sample.sample(det, torch.zeros(1, 3, 32, 32), 1, 4.0, "euler", "simple", pos, neg,
                            torch.zeros(1, 3, 32, 32))
    assert "conditioning's text tokens" not in str(e.value), e.value


def test_benchmark_keeps_the_fast_optimizers_settings(shapes_patcher, shapes_conds):
    """A user trial: the Benchmark given a Fast Optimizer's model ran its fast rows with the default settings, only
    the budget its own, so a model set never to skip (max_consecutive_skips 0) skipped calls there. Now its
    settings are kept and the table names them; a plain model's fast rows skip (the control)."""
    never = N.JetDetFastOptimizer.execute(shapes_patcher, 0.05, 0.0, 0.0, "order1", 0, "off", False).args[0]
    tables = [N.JetDetBenchmark.execute(m, 2, 6, 4.0, "euler", "simple", *shapes_conds, empty_latent(1), 1.0,
                                        "0.3").args[0].splitlines() for m in (shapes_patcher, never)]
    assert int(tables[0][2].split()[5]) < 6, tables[0]  # columns: fast, 0.3, wall, speed-up, fewer, calls
    assert tables[1][2].split()[5] == "6" and tables[1][2].split()[7] == "inf", tables[1]
    assert "max_consecutive_skips 0" in tables[1][-1] and "Fast Optimizer" not in "\n".join(tables[0])


def test_benchmark_names_a_conditioning_of_another_width(shapes_patcher, shapes_conds):
    """A user trial over the HTTP server: the Benchmark samples off first, outside jetdet's mode, so a conditioning
    of another model family stopped it with ComfyUI's own "mat1 and mat2 shapes cannot be multiplied" from inside
    the model. Now it is the Deterministic Sampler's error, naming the conditioning, both widths and the model's own
    error; a budget typed "-0" is labelled 0."""
    pos, neg = shapes_conds
    wide = [[torch.randn(1, 1, 24), dict(neg[0][1])]]
    with pytest.raises(ValueError) as e:
        N.JetDetBenchmark.execute(shapes_patcher, 2, 1, 4.0, "euler", "simple", pos, wide, empty_latent(1), 1.0, "")
    msg = str(e.value)
    assert msg.startswith("positive, negative: the conditioning's text tokens are 24 wide (shape (1, 1, 24) in "
                          "negative), but the model takes 16"), msg
    assert "mat1 and mat2" in msg and e.value.__cause__ is not None, msg
    table = N.JetDetBenchmark.execute(shapes_patcher, 2, 1, 4.0, "euler", "simple", pos, neg, empty_latent(1), 1.0,
                                      "-0").args[0]
    assert table.splitlines()[2].split()[:2] == ["fast", "0"], table


def test_the_empty_latents_downscale_ratio_reaches_comfyui_and_leaves_the_output(shapes_patcher, shapes_conds,
                                                                                  monkeypatch):
    """Newer ComfyUI (a trial on 0.33): "Empty Latent Image" puts ``downscale_ratio_spacial`` in its LATENT and
    KSampler passes it to ``fix_empty_latent_channels``, which sizes the empty latent for a 16x or 32x model, then
    drops it from its output. jetdet's samplers called it without the ratio (a 16x stand-in: 32x32 sampled where
    KSampler sampled 16x16) and passed the key on. Here a ``fix_empty_latent_channels`` of the newer signature
    (ComfyUI 0.3.64 has none) records what it gets."""
    import comfy.sample

    got = []
    stock = comfy.sample.fix_empty_latent_channels

    def newer(model, latent_image, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
        got.append((downscale_ratio_spacial, downscale_ratio_temporal))
        return stock(model, latent_image)

    latent = dict(empty_latent(1), downscale_ratio_spacial=8)
    monkeypatch.setattr(comfy.sample, "fix_empty_latent_channels", newer)
    out = N.JetDetDeterministicSampler.execute(shapes_patcher, 1, 2, 4.0, "euler", "simple", *shapes_conds, latent,
                                               1.0, 0).args[0]
    assert got == [(8, None)]
    assert set(out) == {"samples"}
    got.clear()  # dpm_adaptive samples a batch item by item (a review: the items lost the ratio)
    N.JetDetDeterministicSampler.execute(shapes_patcher, 1, 2, 4.0, "dpm_adaptive", "simple", *shapes_conds,
                                         dict(empty_latent(2), downscale_ratio_spacial=8), 1.0, 0)
    assert got and set(got) == {(8, None)}, got
    monkeypatch.setattr(comfy.sample, "fix_empty_latent_channels", stock)  # ComfyUI 0.3.64's: called as before
    out = N.JetDetDeterministicSampler.execute(shapes_patcher, 1, 2, 4.0, "euler", "simple", *shapes_conds, latent,
                                               1.0, 0).args[0]
    assert set(out) == {"samples"}


def test_nested_latents_are_refused_by_name(shapes_patcher, shapes_conds):
    """Newer ComfyUI (0.7, 0.33) has nested latents (LTX-2's video + audio in one LATENT: ``samples`` is a
    ``comfy.nested_tensor.NestedTensor``, not a tensor). jetdet's nodes do not take them: the error says so, naming
    the input, instead of "expected a LATENT" for what is one (a trial on 0.7.0). A stand-in of the nested tensor,
    which 0.3.64 lacks; on newer ComfyUI its own class too."""
    from jetdet.comfy.nodes import JetDetChecksum, JetDetDeterministicSampler

    class StandInNested:  # what the nodes can see of comfy.nested_tensor.NestedTensor
        def __init__(self, tensors):
            self.tensors, self.is_nested = list(tensors), True

    kinds = [StandInNested]
    try:
        import comfy.nested_tensor

        kinds.append(comfy.nested_tensor.NestedTensor)
    except ImportError:
        pass
    for kind in kinds:
        lat = {"samples": kind([torch.zeros(2, 16, 32, 32), torch.zeros(2, 8, 4, 4)])}
        with pytest.raises(ValueError, match=r"^latent_image: a nested LATENT .* not supported"):
            JetDetDeterministicSampler.execute(shapes_patcher, 7, 2, 4.0, "euler", "simple", *shapes_conds, lat, 1.0, 0)
        with pytest.raises(ValueError, match=r"^latent: a nested LATENT .* not supported"):
            JetDetChecksum.execute(lat)
    with pytest.raises(ValueError, match=r"^latent: expected a LATENT"):  # not nested: the message as before
        JetDetChecksum.execute({"samples": [torch.zeros(1)]})
