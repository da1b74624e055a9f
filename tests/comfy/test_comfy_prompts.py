"""Whole API-format prompts through ComfyUI's own execution engine (validation + PromptExecutor), in-process:
a workflow with the jetdet nodes, and bad input reported the way ComfyUI reports errors (node_errors from
validation, execution_error messages at run time) with the user's model left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ROOT, require_comfyui

require_comfyui()
from _comfy_util import Engine, det_sample, execution_error, load_node_packs, run_prompt

from jetdet.comfy import nodes as N
from jetdet.comfy import wrappers as wr


@pytest.fixture(scope="module")
def engine(comfy_dir):
    load_node_packs(ROOT)


def _base(batch=2, width=256, sampler="euler_ancestral"):
    return {
        "1": {"class_type": "JetDetShapesModelLoader", "inputs": {}},
        "2": {"class_type": "JetDetClassConditioning", "inputs": {"class_index": 4}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": width, "batch_size": batch}},
        "4": {"class_type": "JetDetDeterministicSampler", "inputs": {
            "model": ["1", 0], "seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": sampler, "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0], "denoise": 1.0, "batch_offset": 0}},
        "5": {"class_type": "JetDetChecksum", "inputs": {"latent": ["4", 0]}},
        "6": {"class_type": "JetDetOutputMatcher", "inputs": {"latent": ["4", 0], "tolerance": "exact",
                                                              "reference_checksums": ["4", 1],
                                                              "stop_on_mismatch": True}},
    }


def test_a_workflow_runs_and_matches_its_own_checksums(engine, shapes_patcher, shapes_conds):
    res = run_prompt(_base())
    assert res["valid"] and res["success"], execution_error(res)
    report = res["outputs"]["6"]["text"][0]
    assert report.startswith("MATCH exact against 2 checksums")
    # the same items sampled by the node outside the engine (batch-1, batch_offset 1) give the same bits
    from jetdet.comfy import shapes_model as sm

    single, sums = det_sample(shapes_patcher, sm.class_conditioning(4), sm.null_conditioning(), 1,
                              "euler_ancestral", steps=3, seed=5, offset=1)
    assert sums.split(": ")[1] in report.replace(" ", "") or sums.split(": ")[1][:16] in report


def test_widget_ranges_are_enforced_by_validation(engine):
    p = _base()
    p["4"]["inputs"]["batch_offset"] = -1
    res = run_prompt(p)
    assert not res["valid"]
    errs = res["node_errors"]["4"]["errors"]
    assert any(e["type"] == "value_smaller_than_min" and "batch_offset" in e["details"] for e in errs), errs
    p = _base()
    p["7"] = {"class_type": "JetDetFastOptimizer", "inputs": {
        "model": ["1", 0], "budget": 1.5, "start_percent": 0.0, "end_percent": 0.0, "forecast": "order1",
        "max_consecutive_skips": 8, "linear_attention": "off", "attention_cache": False}}
    p["4"]["inputs"]["model"] = ["7", 0]
    res = run_prompt(p)
    assert not res["valid"]
    assert any(e["type"] == "value_bigger_than_max" and "budget" in e["details"]
               for e in res["node_errors"]["7"]["errors"])


def _selector(samplers, schedulers):
    """A V1 node as sampler/scheduler selectors of node packs write it: outputs typed as lists of choices."""

    class Selector:
        RETURN_TYPES = (samplers, schedulers, "INT")
        FUNCTION = "pick"
        CATEGORY = "test"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"sampler_name": (samplers,), "scheduler": (schedulers,)}}

        def pick(self, sampler_name, scheduler):
            return sampler_name, scheduler, 3

    return Selector


def _linked(p: dict, node: str, sampler: str = "euler", scheduler_slot: int = 1) -> dict:
    p = copy.deepcopy(p)
    p["9"] = {"class_type": "TestSelector", "inputs": {"sampler_name": sampler, "scheduler": "simple"}}
    p[node]["inputs"].update(sampler_name=["9", 0], scheduler=["9", scheduler_slot])
    return p


def test_a_combo_takes_a_link_from_an_output_listing_choices(engine, monkeypatch):
    """Sampler and scheduler selectors of node packs output their lists as the type (the stock KSampler accepts
    the link); ComfyUI 0.3.64 refuses such a link into a V3 combo unless the node checks its links itself. The
    other link checks stay."""
    import comfy.samplers
    import nodes

    ks = comfy.samplers.KSampler
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestSelector", _selector(ks.SAMPLERS, ks.SCHEDULERS))
    p = _base(batch=1, width=128, sampler="dpmpp_2m")
    p["4"]["inputs"]["steps"] = 2
    stock = {"class_type": "KSampler", "inputs": {k: v for k, v in p["4"]["inputs"].items() if k != "batch_offset"}}
    control_prompt = copy.deepcopy(p)
    control_prompt["6"]["inputs"]["reference_checksums"] = ["5", 0]  # the checksum node's (KSampler has none)
    control = run_prompt(_linked(control_prompt | {"4": stock}, "4", "dpmpp_2m"))
    assert control["valid"] and control["success"]  # ComfyUI's own KSampler takes the link
    widget = run_prompt(p)
    linked = run_prompt(_linked(p, "4", "dpmpp_2m"))
    assert linked["valid"] and linked["success"], linked["node_errors"] or execution_error(linked)
    assert linked["outputs"]["6"]["text"] == widget["outputs"]["6"]["text"]  # the linked value was used
    assert run_prompt(_linked(p, "4", "euler"))["outputs"]["6"]["text"] != widget["outputs"]["6"]["text"]
    # the other jetdet nodes with these combos
    refiner = {"class_type": "JetDetMultiPassRefiner", "inputs": {
        **{k: v for k, v in p["4"]["inputs"].items() if k not in ("denoise", "batch_offset")}, "coarse_denoise": 1.0,
        "refine_denoise": 0.5, "detail_denoise": 0.25, "start_pass": "coarse", "end_pass": "coarse",
        "batch_offset": 0}}
    res = run_prompt(_linked(control_prompt | {"4": refiner}, "4"))
    assert res["valid"] and res["success"], res["node_errors"] or execution_error(res)
    bench = {"class_type": "JetDetBenchmark", "inputs": {
        **{k: v for k, v in p["4"]["inputs"].items() if k != "batch_offset"}, "fast_budgets": "0.1"}}
    q = _linked({k: p[k] for k in ("1", "2", "3")} | {"4": bench}, "4")
    assert run_prompt(q)["valid"]

    # an INT output into a combo, a LATENT into the model: refused when queued, naming the input
    res = run_prompt(_linked(p, "4", scheduler_slot=2))
    assert not res["valid"]
    details = [e["details"] for e in res["node_errors"]["4"]["errors"]]
    assert any("scheduler: the linked output's type is INT, expected COMBO" in d for d in details), details
    q = copy.deepcopy(p)
    q["4"]["inputs"]["model"] = ["3", 0]
    res = run_prompt(q)
    assert not res["valid"]
    details = [e["details"] for e in res["node_errors"]["4"]["errors"]]
    assert any("model: the linked output's type is LATENT, expected MODEL" in d for d in details), details
    # a list sharing no choice with the input's is refused; one that shares some runs, and a value outside the
    # input's options stops the node with the input named
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestSelector", _selector(["my_sampler"], ["simple"]))
    res = run_prompt(_linked(p, "4", "my_sampler"))
    assert not res["valid"]
    assert any("sampler_name: the linked output's choices ['my_sampler'] share none" in e["details"]
               for e in res["node_errors"]["4"]["errors"])
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestSelector", _selector(["euler", "my_sampler"], ["simple"]))
    res = run_prompt(_linked(p, "4", "my_sampler"))
    assert res["valid"] and not res["success"]
    assert "sampler_name: expected one of" in execution_error(res)["exception_message"]


def test_a_wrong_latent_shape_is_a_clear_execution_error(engine):
    res = run_prompt(_base(width=512))  # 64 x 64 latents: past the model's 32 x 32 position table
    err = execution_error(res)
    assert not res["success"] and err["node_type"] == "JetDetDeterministicSampler"
    assert "latent_image: SD3 samples latents up to 32 x 32" in err["exception_message"]
    assert "256 x 256 pixels" in err["exception_message"] and "(512 x 512 pixels)" in err["exception_message"]
    p = _base()
    p["3"] = {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 256, "height": 256, "length": 1, "batch_size": 1}}
    err = execution_error(run_prompt(p))
    assert ("latent_image: SD3 samples latents [B, 16, H, W] (4-D, 16 channels); got shape (1, 16, 1, 32, 32)"
            in err["exception_message"])


def test_a_missing_reference_file_is_a_clear_execution_error(engine, tmp_path):
    p = _base()
    p["6"]["inputs"] = {"latent": ["4", 0], "tolerance": "exact", "stop_on_mismatch": False,
                        "reference_file": str(tmp_path / "nope.safetensors")}
    err = execution_error(run_prompt(p))
    assert err["node_type"] == "JetDetOutputMatcher"
    assert f"reference_file: no file at {tmp_path / 'nope.safetensors'}" in err["exception_message"]


def test_an_unsupported_model_is_a_clear_error_and_changes_nothing(comfy_dir, shapes_patcher, shapes_conds):
    import comfy.model_patcher

    not_diffusion = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(TypeError, match="model: Linear is not a diffusion model ComfyUI can sample"):
        N.JetDetModeSwitch.execute(not_diffusion, "deterministic", 0.05, True)
    with pytest.raises(TypeError, match="model: expected a ComfyUI MODEL"):
        N.JetDetFastOptimizer.execute(object(), 0.05, 0.0, 0.0, "order1", 8)
    # bad input on the user's real model: nothing of it changes
    before = (copy.deepcopy(shapes_patcher.model_options), {k: {kk: list(vv) for kk, vv in v.items()}
                                                             for k, v in shapes_patcher.wrappers.items()})
    with pytest.raises(ValueError, match="budget"):
        N.JetDetFastOptimizer.execute(shapes_patcher, -0.5, 0.0, 0.0, "order1", 8)
    with pytest.raises(ValueError, match="batch_offset"):
        N.JetDetDeterministicSampler.execute(shapes_patcher, 1, 2, 4.0, "euler", "simple", *shapes_conds,
                                             {"samples": torch.zeros(1, 16, 32, 32)}, 1.0, -1)
    with pytest.raises(ValueError, match="latent_image"):
        N.JetDetDeterministicSampler.execute(shapes_patcher, 1, 2, 4.0, "euler", "simple", *shapes_conds,
                                             {"samples": torch.ones(1, 4, 32, 32)}, 1.0, 0)
    after = (shapes_patcher.model_options, shapes_patcher.wrappers)
    assert str(before[0]) == str(after[0]) and before[1] == {k: {kk: list(vv) for kk, vv in v.items()}
                                                             for k, v in after[1].items()}
    assert wr.jetdet_keys(shapes_patcher) == {}


def test_clone_safety_the_original_model_samples_as_if_jetdet_never_ran(comfy_dir, shapes_patcher, shapes_conds):
    from _comfy_util import empty_latent, stock_ksampler

    before = stock_ksampler(shapes_patcher, *shapes_conds, empty_latent(2), "euler_ancestral", steps=4)
    det = N.JetDetModeSwitch.execute(shapes_patcher, "deterministic", 0.05, True).args[0]
    fast = N.JetDetModeSwitch.execute(shapes_patcher, "fast", 0.2, True).args[0]
    stock_ksampler(det, *shapes_conds, empty_latent(2), "euler_ancestral", steps=4)
    stock_ksampler(fast, *shapes_conds, empty_latent(2), "euler_ancestral", steps=4)
    det_sample(shapes_patcher, *shapes_conds, 2, "dpmpp_sde", steps=3)
    after = stock_ksampler(shapes_patcher, *shapes_conds, empty_latent(2), "euler_ancestral", steps=4)
    assert torch.equal(before, after)
    assert wr.jetdet_keys(shapes_patcher) == {}
    # and the deterministic clone really is different from the original (the test can fail)
    assert not torch.equal(stock_ksampler(det, *shapes_conds, empty_latent(2), "euler_ancestral", steps=4), before)


# ------------------------------------------------------------------ files read by nodes, and ComfyUI's output cache


def _recall_prompt(folder, ref):
    return {
        "1": {"class_type": "JetDetCacheManager", "inputs": {"action": "recall", "key": "k", "folder": folder,
                                                             "device_budget_mb": -1.0, "cpu_budget_mb": -1.0,
                                                             "disk_budget_mb": 0.0}},
        "2": {"class_type": "JetDetOutputMatcher", "inputs": {"latent": ["1", 1], "tolerance": "exact",
                                                              "reference_file": ref, "stop_on_mismatch": False}},
    }


def test_a_changed_file_is_read_again_not_served_from_comfyuis_cache(engine, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    import jetdet

    folder, ref = str(tmp_path / "store"), str(tmp_path / "ref.safetensors")
    a, b, c = (torch.full((1, 16, 8, 8), v) for v in (1.0, 2.0, 3.0))  # the same file size
    N.recall_store("k", "latent", a, folder)
    save_file({"samples": a}, ref)
    eng = Engine()  # one executor, as the server keeps: its cache lives from prompt to prompt
    res = eng.run(_recall_prompt(folder, ref))
    assert res["success"], execution_error(res)
    assert jetdet.checksum(a)[:16] in res["outputs"]["1"]["text"][0]
    assert res["outputs"]["2"]["text"][0].startswith("MATCH")
    res = eng.run(_recall_prompt(folder, ref))
    assert set(res["cached"]) == {"1", "2"}  # nothing changed: both served from the cache
    # another prompt stores new data under the key, and the reference file is rewritten
    N.recall_store("k", "latent", b, folder)
    save_file({"samples": b}, ref)
    res = eng.run(_recall_prompt(folder, ref))
    assert res["cached"] == [] and jetdet.checksum(b)[:16] in res["outputs"]["1"]["text"][0]
    assert res["outputs"]["2"]["text"][0].startswith("MATCH")
    # only the reference changes: the matcher runs again, the recall stays cached
    save_file({"samples": c}, ref)
    res = eng.run(_recall_prompt(folder, ref))
    assert res["cached"] == ["1"] and res["outputs"]["2"]["text"][0].startswith("MISMATCH")
    # the stored file is tampered with (same size, its old metadata): the checksum check runs and fails
    path = N.recall_path("k", folder)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file({"samples": c}, path, metadata=meta)
    err = execution_error(eng.run(_recall_prompt(folder, ref)))
    assert err and err["node_type"] == "JetDetCacheManager" and "does not match the checksum" in err[
        "exception_message"]


def test_store_and_recall_under_the_lru_cache(engine, tmp_path):
    import execution

    folder = str(tmp_path)

    def store(width):
        return {"1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": width,
                                                                      "batch_size": 1}},
                "2": {"class_type": "JetDetCacheManager", "inputs": {
                    "action": "store", "key": "k", "folder": folder, "latent": ["1", 0], "device_budget_mb": -1.0,
                    "cpu_budget_mb": -1.0, "disk_budget_mb": 0.0}}}

    recall = {"1": {"class_type": "JetDetCacheManager", "inputs": {
        "action": "recall", "key": "k", "folder": folder, "device_budget_mb": -1.0, "cpu_budget_mb": -1.0,
        "disk_budget_mb": 0.0}}}
    eng = Engine(execution.CacheType.LRU, 10)  # the server's --cache-lru 10: keeps results of earlier prompts
    for width, shape in ((256, "(1, 16, 32, 32)"), (128, "(1, 16, 16, 16)"), (256, "(1, 16, 32, 32)")):
        res = eng.run(store(width))  # the third store must write again: another prompt overwrote the key
        assert res["success"], execution_error(res)
        res = eng.run(recall)
        assert res["success"] and f"recalled latent {shape}" in res["outputs"]["1"]["text"][0], res["outputs"]


def test_a_cache_manager_output_with_nothing_to_give_is_a_clear_error(engine, tmp_path):
    folder = str(tmp_path)
    N.recall_store("img", "image", torch.rand(1, 32, 32, 3), folder)
    cm = {"class_type": "JetDetCacheManager", "inputs": {"action": "recall", "key": "img", "folder": folder,
                                                         "device_budget_mb": -1.0, "cpu_budget_mb": -1.0,
                                                         "disk_budget_mb": 0.0}}
    p = _base(batch=1)
    p["4"]["inputs"]["latent_image"] = ["7", 1]  # the LATENT output of an image key
    p["7"] = cm
    err = execution_error(run_prompt(p))
    assert err["node_type"] == "JetDetCacheManager", err
    assert ("LATENT output is empty: key 'img' holds an image (1, 32, 32, 3), not a latent; take the IMAGE output "
            "(connected to node 4)") in err["exception_message"]
    p = _base(batch=1)
    p["7"] = cm  # no model input: its MODEL output has nothing to pass through
    p["8"] = {"class_type": "JetDetModeSwitch", "inputs": {"model": ["7", 0], "mode": "deterministic",
                                                            "budget": 0.05, "strict": True}}
    p["4"]["inputs"]["model"] = ["8", 0]
    err = execution_error(run_prompt(p))
    assert err["node_type"] == "JetDetCacheManager"
    assert "MODEL output is empty: no model is connected to the model input" in err["exception_message"]
    # served from ComfyUI's cache to a node connected later: the node is blocked with the message, never given None
    eng = Engine()
    first = {"7": cm, "9": {"class_type": "JetDetChecksum", "inputs": {"image": ["7", 2]}},
             "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}
    assert eng.run(first)["success"]
    dangling = dict(first, **{"11": {"class_type": "JetDetChecksum", "inputs": {"latent": ["7", 1]}}})
    res = run_prompt(dangling)  # a node taking the empty output that never runs (its result reaches no output)
    assert res["success"] and not [d for e, d in res["sent"] if e == "execution_error"], execution_error(res)
    second = dict(first, **{"11": {"class_type": "JetDetChecksum", "inputs": {"latent": ["7", 1]}},
                            "12": {"class_type": "PreviewAny", "inputs": {"source": ["11", 0]}}})
    res = eng.run(second)
    assert "7" in res["cached"] and execution_error(res) is None
    blocked = [d for e, d in res["sent"] if e == "execution_error"]
    assert blocked and blocked[0]["node_id"] == "11"
    assert "LATENT output is empty: key 'img' holds an image" in blocked[0]["exception_message"]
