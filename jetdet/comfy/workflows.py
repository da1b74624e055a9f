"""ComfyUI workflows in both of ComfyUI's formats, from the node definitions its server lists (``/object_info``).

* The **API format** (``{node id: {"class_type", "inputs"}}``) is what ``POST /prompt`` runs: every input by name,
  a link as ``[source node id, output index]``.
* The **UI format** (LiteGraph's ``nodes`` / ``links`` / ``widgets_values``, version 0.4) is what the web page
  opens, saves and lists as a template (``example_workflows/`` of a custom node folder). A node's widget values
  are a list in the order of its widget inputs (required, then optional), an INT with ``control_after_generate``
  (a seed) followed by its control value; an input given by a link is a socket in ``inputs`` (a widget input
  linked in keeps its place in the list, as the page saves it).

:func:`api_to_ui` lays an API prompt out as a UI workflow (columns by depth in the graph), :func:`ui_to_api` reads
a UI workflow back as ComfyUI's page does when it queues it. The repository's ``example_workflows/`` are written by
``bench/comfy_workflows.py`` and run through the server by ``tests/comfy/test_comfy_server.py``. Pure JSON: no
ComfyUI import.
"""

from __future__ import annotations

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


def _inputs(info: dict) -> list[tuple[str, list]]:
    """A node's inputs in order, as ``(name, spec)``: required, then optional."""
    out = []
    for part in ("required", "optional"):
        specs = info.get("input", {}).get(part, {})
        for name in info.get("input_order", {}).get(part, list(specs)):
            out.append((name, specs[name]))
    return out


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control(spec) -> bool:
    return spec[0] == "INT" and len(spec) > 1 and bool(spec[1].get("control_after_generate"))


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and type(v[1]) is int


def _depths(prompt: dict) -> dict:
    memo: dict = {}

    def depth(nid, seen=()):
        if nid not in memo:
            if nid in seen:
                raise ValueError(f"prompt: node {nid} is part of a cycle")
            ups = [(name, v[0]) for name, v in prompt[nid]["inputs"].items() if _is_link(v)]
            for name, u in ups:
                if u not in prompt:
                    raise ValueError(f"prompt: node {nid} input {name!r} links to missing node {u}")
            memo[nid] = 1 + max((depth(u, (*seen, nid)) for _, u in ups), default=-1)
        return memo[nid]

    return {nid: depth(nid) for nid in prompt}


def api_to_ui(prompt: dict, object_info: dict, titles: dict | None = None) -> dict:
    """The UI-format workflow of an API-format ``prompt``: a column per depth in the graph (the page sizes the
    nodes itself when it opens the workflow), every widget value from the prompt (a widget the prompt leaves out
    takes its default), seeds ``fixed``. ``titles`` names nodes (``{node id: title}``). Raises ``ValueError`` for
    a node type ``object_info`` does not list, an input it does not have, or a link to a missing node."""
    titles = titles or {}
    depths = _depths(prompt)
    order = sorted(prompt, key=lambda n: (depths[n], int(n)))
    rows: dict = {}
    nodes, links = [], []
    out_links: dict = {}
    for nid in order:
        node = prompt[nid]
        info = object_info.get(node["class_type"])
        if info is None:
            raise ValueError(f"prompt: node {nid}: unknown node type {node['class_type']!r}")
        inputs = _inputs(info)
        unknown = set(node["inputs"]) - {name for name, _ in inputs}
        if unknown:
            raise ValueError(f"prompt: node {nid} ({node['class_type']}): no input(s) {sorted(unknown)}")
        sockets, widgets = [], []
        for name, spec in inputs:
            v = node["inputs"].get(name)
            if _is_link(v):
                src, slot = v
                src_info = object_info[prompt[src]["class_type"]]
                link_id = len(links) + 1
                typ = src_info["output"][slot]
                links.append([link_id, int(src), slot, int(nid), len(sockets), typ])
                out_links.setdefault((src, slot), []).append(link_id)
                sock = {"name": name, "type": typ if isinstance(spec[0], list) else spec[0], "link": link_id}
                if _is_widget(spec):
                    sock["widget"] = {"name": name}
                sockets.append(sock)
            elif not _is_widget(spec):  # an unconnected optional socket
                sockets.append({"name": name, "type": spec[0], "link": None})
            if _is_widget(spec):
                if v is None or _is_link(v):
                    opts = spec[1] if len(spec) > 1 else {}
                    v = opts.get("default", spec[0][0] if isinstance(spec[0], list) else opts.get("options", [None])[0])
                widgets.append(v)
                if _has_control(spec):
                    widgets.append("fixed")
        col = depths[nid]
        height = 60 + 26 * (len(widgets) + len(sockets) + len(info["output"]))
        y = rows.get(col, 40)
        rows[col] = y + height + 50
        entry = {"id": int(nid), "type": node["class_type"], "pos": [40 + 400 * col, y],
                 "size": [360, height], "flags": {}, "order": len(nodes),
                 "mode": 0, "inputs": sockets, "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                 "widgets_values": widgets}
        if nid in titles:
            entry["title"] = titles[nid]
        nodes.append(entry)
    for entry in nodes:
        info = object_info[entry["type"]]
        names = info.get("output_name") or info["output"]
        entry["outputs"] = [{"name": names[i], "type": t, "links": out_links.get((str(entry["id"]), i), []),
                             "slot_index": i} for i, t in enumerate(info["output"])]
    return {"last_node_id": max(int(n) for n in prompt), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt ComfyUI's page queues for a UI-format ``workflow``: each active node's widget values
    matched to its widget inputs in order (a seed's control value skipped), linked inputs as links. Muted and
    bypassed nodes are left out. Raises ``ValueError`` naming the node for a type ``object_info`` does not list or
    too few widget values."""
    links = {ln[0]: ln for ln in workflow.get("links", [])}
    prompt = {}
    for node in workflow.get("nodes", []):
        if node.get("mode", 0) != 0:
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise ValueError(f"workflow: node {node['id']}: unknown node type {node['type']!r}")
        linked = {s["name"]: links[s["link"]] for s in node.get("inputs", []) if s.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs, i = {}, 0
        for name, spec in _inputs(info):
            if _is_widget(spec):
                if i >= len(values):
                    raise ValueError(f"workflow: node {node['id']} ({node['type']}): no widget value for {name!r}")
                inputs[name] = values[i]
                i += 2 if _has_control(spec) else 1
            if name in linked:
                ln = linked[name]
                inputs[name] = [str(ln[1]), ln[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ---------------------------------------------------------------------------------------------- the examples

def _sampler(model, latent, offset, positive=("2", 0), negative=("2", 1), **settings):
    inputs = {"model": model, "seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler_ancestral",
              "scheduler": "simple", "positive": list(positive), "negative": list(negative), "latent_image": latent,
              "denoise": 1.0, "batch_offset": offset}
    inputs.update(settings)
    return {"class_type": "JetDetDeterministicSampler", "inputs": inputs}


#: The workflows in ``example_workflows/`` (API format; ``bench/comfy_workflows.py`` writes them in the UI format
#: with these titles). The two ``shapes_*`` ones run on the model jetdet ships, with no download.
EXAMPLES = {
    "jetdet_shapes_deterministic": ({
        "1": {"class_type": "JetDetShapesModelLoader", "inputs": {"path": ""}},
        "2": {"class_type": "JetDetClassConditioning", "inputs": {"class_index": 3}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 4}},
        "4": {"class_type": "JetDetModeSwitch", "inputs": {"model": ["1", 0], "mode": "deterministic",
                                                            "budget": 0.05, "strict": True}},
        "5": _sampler(["4", 0], ["3", 0], 0),
        "6": {"class_type": "JetDetShapesDecode", "inputs": {"samples": ["5", 0], "scale": 4}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
        "9": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "10": _sampler(["4", 0], ["9", 0], 2),
        "11": {"class_type": "JetDetOutputMatcher", "inputs": {
            "latent": ["10", 0], "tolerance": "exact", "reference_checksums": ["5", 1], "stop_on_mismatch": True,
            "batch_offset": 2}},
        "12": {"class_type": "PreviewAny", "inputs": {"source": ["11", 1]}},
    }, {"5": "Deterministic Sampler: a batch of 4", "8": "Checksums of the 4 items",
        "10": "The same sampler: item 2 alone (batch_offset 2)",
        "11": "Proof: item 2 alone is item 2 of the batch, bit for bit", "12": "Matcher report"}),
    "jetdet_shapes_fast": ({
        "1": {"class_type": "JetDetShapesModelLoader", "inputs": {"path": ""}},
        "2": {"class_type": "JetDetClassConditioning", "inputs": {"class_index": 5}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 2}},
        "4": {"class_type": "JetDetFastOptimizer", "inputs": {
            "model": ["1", 0], "budget": 0.05, "start_percent": 0.0, "end_percent": 0.0, "forecast": "order1",
            "max_consecutive_skips": 3, "linear_attention": "off", "attention_cache": False}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0], "denoise": 1.0}},
        "6": {"class_type": "JetDetShapesDecode", "inputs": {"samples": ["5", 0], "scale": 4}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "JetDetCacheManager", "inputs": {
            "action": "stats", "model": ["4", 0], "after": ["5", 0], "device_budget_mb": -1.0, "cpu_budget_mb": -1.0,
            "disk_budget_mb": 0.0}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 3]}},
        "10": {"class_type": "JetDetBenchmark", "inputs": {
            "model": ["1", 0], "seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0], "denoise": 1.0,
            "fast_budgets": "0.02,0.05,0.1"}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["10", 1]}},
    }, {"4": "Fast mode (the step cache)", "8": "What the step cache saved",
        "10": "Off / fast / deterministic, timed from the same noise"}),
    "jetdet_deterministic_txt2img": ({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor lighthouse on a cliff at dusk",
                                                          "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 4}},
        "5": {"class_type": "JetDetModeSwitch", "inputs": {"model": ["1", 0], "mode": "deterministic",
                                                            "budget": 0.05, "strict": True}},
        "6": _sampler(["5", 0], ["4", 0], 0, ("2", 0), ("3", 0), steps=25, cfg=7.0, scheduler="normal"),
        "7": {"class_type": "JetDetDeterministicVAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2],
                                                                        "strict": True}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "jetdet_deterministic"}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["6", 1]}},
    }, {"1": "Your checkpoint (pick it here)", "6": "Deterministic Sampler: item i = item i alone (batch_offset i)",
        "7": "Deterministic VAE Decode", "9": "Checksums: compare them across runs and batch sizes"}),
}
