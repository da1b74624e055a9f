"""Once through ComfyUI's HTTP server on loopback, the way the web UI and API clients drive it: jetdet cloned into
custom_nodes, every node in /object_info, one API-format prompt that uses every node (plus ComfyUI's own
Load Diffusion Model on the shipped weights and its stock KSampler on the fast model), /history for the results,
and bad input answered in ComfyUI's error format."""

from __future__ import annotations

import copy
import json
import shutil
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, comfyui_dir, require_comfyui

require_comfyui()

import tiny_models as tm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jetdet.comfy import NODE_IDS  # noqa: E402
from jetdet.comfy import shapes_model as sm  # noqa: E402
from jetdet.comfy.workflows import EXAMPLES, api_to_ui, ui_to_api  # noqa: E402

STARTUP_S = 300
#: Nodes the server prompt leaves out, and why. The audio decode node needs an audio VAE, and ComfyUI's VAELoader
#: builds those (Stable Audio's, ACE-Step's) at full size only, hundreds of MB of weights; it runs in-process on a
#: tiny Oobleck VAE in test_comfy_vae.py, and test_object_info_lists_every_node checks the server lists it.
NOT_IN_THE_PROMPT = {"JetDetDeterministicVAEDecodeAudio"}


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from jetdet.comfy.runtime import start_server, stop_server

    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "jetdet").symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    shutil.copy(sm.MODEL_FILE, base / "models" / "diffusion_models" / "jetdet_shapes.safetensors")
    (base / "models" / "vae_approx").mkdir()
    for name, sd in tm.taesd3_files(0).items():  # a TAESD3 with random weights: VAELoader lists it as "taesd3"
        save_file(sd, str(base / "models" / "vae_approx" / name))
    proc, url, _ = start_server(base, comfyui_dir(), timeout=STARTUP_S)
    try:
        yield url, base
    finally:
        stop_server(proc)


def _run(url: str, prompt: dict, timeout: float = 900) -> dict:
    code, resp = _post(url + "/prompt", {"prompt": prompt, "client_id": "jetdet-test"})
    assert code == 200 and not resp.get("node_errors"), resp  # else ComfyUI runs only the outputs that validate
    pid = resp["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = _get(f"{url}/history/{pid}")
        if pid in h and h[pid].get("status", {}).get("completed") is not None:
            if h[pid]["status"]["status_str"] in ("success", "error"):
                return h[pid]
        time.sleep(1)
    raise TimeoutError(f"prompt {pid} did not finish")


def _every_node_prompt() -> dict:
    ks = dict(seed=3, steps=3, cfg=4.0, sampler_name="euler_ancestral", scheduler="simple")
    return {
        "1": {"class_type": "JetDetShapesModelLoader", "inputs": {}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "jetdet_shapes.safetensors",
                                                     "weight_dtype": "default"}},
        "3": {"class_type": "JetDetExpertSelector", "inputs": {"model_1": ["1", 0], "model_2": ["2", 0],
                                                                "prompt": "a circle"}},
        "4": {"class_type": "JetDetClassConditioning", "inputs": {"class_index": 0}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 2}},
        "6": {"class_type": "JetDetModeSwitch", "inputs": {"model": ["3", 0], "mode": "deterministic",
                                                            "budget": 0.05, "strict": True}},
        "7": {"class_type": "JetDetDeterministicSampler", "inputs": {
            "model": ["6", 0], **ks, "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["5", 0],
            "denoise": 1.0, "batch_offset": 0}},
        "8": {"class_type": "JetDetChecksum", "inputs": {"latent": ["7", 0]}},
        "9": {"class_type": "JetDetOutputMatcher", "inputs": {"latent": ["7", 0], "tolerance": "exact",
                                                               "reference_checksums": ["8", 0],
                                                               "stop_on_mismatch": True}},
        "10": {"class_type": "JetDetFastOptimizer", "inputs": {
            "model": ["2", 0], "budget": 0.2, "start_percent": 0.0, "end_percent": 0.0, "forecast": "order1",
            "max_consecutive_skips": 8, "linear_attention": "off", "attention_cache": False}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["10", 0], **ks, "steps": 8, "positive": ["4", 0],
                                                     "negative": ["4", 1], "latent_image": ["5", 0], "denoise": 1.0}},
        "12": {"class_type": "JetDetCacheManager", "inputs": {"action": "stats", "model": ["10", 0],
                                                               "after": ["11", 0], "device_budget_mb": -1.0,
                                                               "cpu_budget_mb": -1.0, "disk_budget_mb": 0.0}},
        "13": {"class_type": "JetDetMultiPassRefiner", "inputs": {
            "model": ["1", 0], **ks, "steps": 2, "positive": ["4", 0], "negative": ["4", 1],
            "latent_image": ["5", 0], "coarse_denoise": 1.0, "refine_denoise": 0.5, "detail_denoise": 0.25,
            "start_pass": "coarse", "end_pass": "detail", "batch_offset": 0}},
        "14": {"class_type": "JetDetShapesDecode", "inputs": {"samples": ["13", 0], "scale": 4}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "jetdet_test"}},
        "16": {"class_type": "JetDetBenchmark", "inputs": {"model": ["1", 0], **ks, "positive": ["4", 0],
                                                            "negative": ["4", 1], "latent_image": ["5", 0],
                                                            "denoise": 1.0, "fast_budgets": "0.1"}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 1], "filename_prefix": "jetdet_plot"}},
        "18": {"class_type": "JetDetCacheManager", "inputs": {"action": "store", "key": "wf-latent",
                                                               "latent": ["7", 0], "device_budget_mb": -1.0,
                                                               "cpu_budget_mb": -1.0, "disk_budget_mb": 0.0}},
        "19": {"class_type": "JetDetCacheManager", "inputs": {"action": "recall", "key": "wf-latent",
                                                               "after": ["18", 1], "device_budget_mb": -1.0,
                                                               "cpu_budget_mb": -1.0, "disk_budget_mb": 0.0}},
        "20": {"class_type": "JetDetOutputMatcher", "inputs": {"latent": ["19", 1], "tolerance": "exact",
                                                                "reference_latent": ["7", 0],
                                                                "stop_on_mismatch": True}},
        "21": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd3"}},
        "22": {"class_type": "JetDetDeterministicVAEDecode", "inputs": {"samples": ["7", 0], "vae": ["21", 0],
                                                                         "strict": True}},
        "23": {"class_type": "JetDetDeterministicVAEEncode", "inputs": {"pixels": ["22", 0], "vae": ["21", 0],
                                                                         "strict": True}},
        "24": {"class_type": "JetDetChecksum", "inputs": {"latent": ["23", 0]}},
        "25": {"class_type": "JetDetOutputMatcher", "inputs": {"latent": ["23", 0], "tolerance": "exact",
                                                                "reference_checksums": ["24", 0],
                                                                "stop_on_mismatch": True}},
        # the Advanced sampler over the whole schedule is the Deterministic Sampler: the same checksums
        "26": {"class_type": "JetDetDeterministicSamplerAdvanced", "inputs": {
            "model": ["6", 0], "add_noise": "enable", "noise_seed": ks["seed"],
            **{k: v for k, v in ks.items() if k != "seed"}, "positive": ["4", 0], "negative": ["4", 1],
            "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable", "batch_offset": 0}},
        "27": {"class_type": "JetDetOutputMatcher", "inputs": {"latent": ["26", 0], "tolerance": "exact",
                                                                "reference_checksums": ["8", 0],
                                                                "stop_on_mismatch": True}},
    }


def test_object_info_lists_every_node(server):
    url, _ = server
    info = _get(url + "/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, node_id
        node = info[node_id]
        assert node["category"] == "jetdet"
        for group in ("required", "optional"):
            for name, spec in node["input"].get(group, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name}"


def test_a_prompt_with_every_node_runs_through_the_server(server):
    url, base = server
    prompt = _every_node_prompt()
    assert {v["class_type"] for v in prompt.values()} >= set(NODE_IDS) - NOT_IN_THE_PROMPT
    h = _run(url, prompt)
    assert h["status"]["status_str"] == "success", h["status"]
    out = h["outputs"]
    assert out["9"]["text"][0].startswith("MATCH exact against 2 checksums")
    assert out["20"]["text"][0].startswith("MATCH exact")
    assert out["25"]["text"][0].startswith("MATCH exact against 2 checksums")  # the VAE nodes ran on both items
    assert out["27"]["text"][0].startswith("MATCH exact against 2 checksums")
    assert "calls 8" in out["12"]["text"][0]
    assert out["16"]["text"][0].splitlines()[0].startswith("run")
    for node in ("15", "17"):
        for img in out[node]["images"]:
            assert (base / "output" / img["subfolder"] / img["filename"]).is_file()
    assert (base / "output" / "jetdet_recall" / "wf-latent.safetensors").is_file()


def test_bad_input_is_answered_in_comfyuis_error_format(server, tmp_path):
    url, _ = server
    p = _every_node_prompt()
    p["7"]["inputs"]["batch_offset"] = -1
    p = {k: p[k] for k in ("1", "2", "3", "4", "5", "6", "7", "8", "9")}  # every output depends on node 7
    code, resp = _post(url + "/prompt", {"prompt": p})
    assert code == 400
    assert resp["error"]["type"] == "prompt_outputs_failed_validation"
    assert any(e["type"] == "value_smaller_than_min" for e in resp["node_errors"]["7"]["errors"])
    # a combo value not in its list is refused when queued (ComfyUI 0.3.64 checks V3 combos only when the node runs,
    # after everything upstream); the other inputs keep ComfyUI's own range checks
    p = _every_node_prompt()
    p["6"]["inputs"]["mode"] = "turbo"
    p["7"]["inputs"]["sampler_name"] = "turbo"
    p["7"]["inputs"]["steps"] = 0
    code, resp = _post(url + "/prompt", {"prompt": {k: p[k] for k in ("1", "2", "3", "4", "5", "6", "7", "8", "9")}})
    assert code == 400, resp
    details = {n: [e.get("details", "") for e in v["errors"]] for n, v in resp["node_errors"].items()}
    assert any("mode: expected one of ['off', 'fast', 'deterministic'], got 'turbo'" in d for d in details["6"])
    assert any("sampler_name: expected one of" in d and "got 'turbo'" in d for d in details["7"]), details
    assert any(e["type"] == "value_smaller_than_min" for e in resp["node_errors"]["7"]["errors"])  # steps
    p = _every_node_prompt()
    p["9"]["inputs"] = {"latent": ["7", 0], "tolerance": "exact", "stop_on_mismatch": False,
                        "reference_file": str(tmp_path / "missing.safetensors")}
    h = _run(url, {k: p[k] for k in ("1", "2", "3", "4", "5", "6", "7", "9")})
    assert h["status"]["status_str"] == "error"
    errs = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert errs and errs[0]["node_type"] == "JetDetOutputMatcher"
    assert "reference_file: no file at" in errs[0]["exception_message"]


#: The ComfyUI whose node definitions ``example_workflows/`` is laid out for (CI's, with which
#: ``bench/comfy_workflows.py`` writes them). Another ComfyUI's own nodes may have other outputs (0.33's Preview Image,
#: Preview Any and Save Image pass their input on), which moves the layout: there the files are compared without it.
EXAMPLES_WRITTEN_FOR = "0.3.64"


def _example(name: str) -> dict:
    return json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())


def _without_layout(workflow: dict) -> dict:
    """A UI workflow less what another ComfyUI's definitions of its own nodes change: positions, sizes, and the
    output slots of ComfyUI's nodes that no link uses (jetdet's nodes keep all of theirs)."""
    workflow = copy.deepcopy(workflow)
    for node in workflow["nodes"]:
        del node["pos"], node["size"]
        if not node["type"].startswith("JetDet"):
            node["outputs"] = [o for o in node.get("outputs", []) if o.get("links")]
    return workflow


def test_example_workflows_are_what_the_generator_writes(server):
    """``example_workflows/`` holds ``bench/comfy_workflows.py``'s output for this ComfyUI's node definitions (on
    another ComfyUI than CI's, but for the layout of ComfyUI's own nodes), and reading each file back as the page
    queues it gives every input of its definition."""
    import comfyui_version

    url, _ = server
    info = _get(url + "/object_info")
    assert sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json")) == sorted(EXAMPLES)
    # ComfyUI lists them under Browse Templates for the custom node folder, and serves them
    assert sorted(_get(url + "/workflow_templates")["jetdet"]) == sorted(EXAMPLES)
    assert _get(url + "/api/workflow_templates/jetdet/jetdet_shapes_fast.json") == _example("jetdet_shapes_fast")
    for name, (prompt, titles) in EXAMPLES.items():
        shipped, written = _example(name), json.loads(json.dumps(api_to_ui(prompt, info, titles)))
        if comfyui_version.__version__ == EXAMPLES_WRITTEN_FOR:
            assert shipped == written, f"{name}: out of date, run bench/comfy_workflows.py"
        else:
            assert _without_layout(shipped) == _without_layout(written), \
                f"{name}: out of date, run bench/comfy_workflows.py with ComfyUI {EXAMPLES_WRITTEN_FOR}"
        back = ui_to_api(shipped, info)
        assert back.keys() == prompt.keys()
        for nid, node in prompt.items():
            assert back[nid]["class_type"] == node["class_type"]
            assert {k: back[nid]["inputs"][k] for k in node["inputs"]} == node["inputs"], (name, nid)


def test_the_shapes_examples_run_as_the_page_queues_them(server):
    """The two examples that need no download, read as ComfyUI's page reads them, run through the server; in the
    deterministic one the matcher finds item 2 sampled alone equal to item 2 of the batch of 4."""
    url, base = server
    info = _get(url + "/object_info")
    h = _run(url, ui_to_api(_example("jetdet_shapes_deterministic"), info))
    assert h["status"]["status_str"] == "success", h["status"]
    report = h["outputs"]["12"]["text"][0]
    assert report.startswith("MATCH exact") and "item 2: match" in report, report
    assert len(h["outputs"]["8"]["text"][0].splitlines()) == 4
    h = _run(url, ui_to_api(_example("jetdet_shapes_fast"), info))
    assert h["status"]["status_str"] == "success", h["status"]
    assert "calls_saved" in h["outputs"]["9"]["text"][0] and h["outputs"]["11"]["text"][0].startswith("run")
    assert h["outputs"]["12"]["images"]


def test_the_checkpoint_example_is_valid_but_for_the_checkpoint_it_names(server):
    """The txt2img example needs the user's SD checkpoint. The server's own validation of it, where there is
    none, finds nothing wrong but the checkpoint name; with the seed's control value dropped from the widget
    values (every later value shifted by one place) it refuses the sampler: the negative control."""
    url, _ = server
    info = _get(url + "/object_info")
    code, resp = _post(url + "/prompt", {"prompt": ui_to_api(_example("jetdet_deterministic_txt2img"), info)})
    assert code == 400 and set(resp["node_errors"]) == {"1"}, resp
    assert all("ckpt_name" in (e.get("details", "") + e.get("message", "")) for e in resp["node_errors"]["1"]["errors"])
    wf = _example("jetdet_shapes_deterministic")
    node = next(n for n in wf["nodes"] if n["id"] == 5)
    node["widgets_values"] = node["widgets_values"][:1] + node["widgets_values"][2:] + [0]  # the seed's "fixed" out
    code, resp = _post(url + "/prompt", {"prompt": ui_to_api(wf, info)})
    assert code == 400 and "5" in resp["node_errors"], resp
