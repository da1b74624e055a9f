"""The workflow format conversions of jetdet.comfy.workflows on a small node table (no ComfyUI needed; the
examples against a real server: tests/comfy/test_comfy_server.py)."""

from __future__ import annotations

import pytest

from jetdet.comfy.workflows import api_to_ui, ui_to_api

INFO = {
    "Load": {"input": {"required": {"name": [["a.pt", "b.pt"], {}]}}, "input_order": {"required": ["name"]},
             "output": ["MODEL", "CLIP"], "output_name": ["MODEL", "CLIP"]},
    "Sample": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"default": 0,
                                                                                 "control_after_generate": True}],
                                      "steps": ["INT", {"default": 20}], "text": ["STRING", {"default": ""}]},
                         "optional": {"mode": ["COMBO", {"default": "x", "options": ["x", "y"]}]}},
               "input_order": {"required": ["model", "seed", "steps", "text"], "optional": ["mode"]},
               "output": ["LATENT", "STRING"], "output_name": ["LATENT", "report"]},
}
PROMPT = {"1": {"class_type": "Load", "inputs": {"name": "b.pt"}},
          "2": {"class_type": "Sample", "inputs": {"model": ["1", 0], "seed": 7, "steps": 3, "text": "hi"}},
          "3": {"class_type": "Sample", "inputs": {"model": ["1", 0], "seed": 8, "steps": 4, "text": ["2", 1],
                                                   "mode": "y"}}}


def test_api_to_ui_lays_out_widgets_links_and_seed_controls():
    ui = api_to_ui(PROMPT, INFO, {"3": "second"})
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert nodes[2]["widgets_values"] == [7, "fixed", 3, "hi", "x"]  # the optional combo at its default
    assert nodes[3]["widgets_values"] == [8, "fixed", 4, "", "y"]  # a linked widget keeps its place (its default)
    assert nodes[3]["title"] == "second" and nodes[1]["pos"][0] < nodes[2]["pos"][0] < nodes[3]["pos"][0]
    assert nodes[3]["inputs"] == [{"name": "model", "type": "MODEL", "link": 2},
                                  {"name": "text", "type": "STRING", "link": 3, "widget": {"name": "text"}}]
    assert ui["links"] == [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 0, 3, 0, "MODEL"], [3, 2, 1, 3, 1, "STRING"]]
    assert nodes[1]["outputs"][0]["links"] == [1, 2] and nodes[2]["outputs"][1]["links"] == [3]


def test_ui_to_api_reads_it_back_and_leaves_out_muted_nodes():
    ui = api_to_ui(PROMPT, INFO)
    back = ui_to_api(ui, INFO)
    assert back["1"] == PROMPT["1"] and back["3"] == PROMPT["3"]
    assert back["2"] == {"class_type": "Sample", "inputs": {**PROMPT["2"]["inputs"], "mode": "x"}}
    ui["nodes"][1]["mode"] = 2  # muted
    assert set(ui_to_api(ui, INFO)) == {"1", "3"}


@pytest.mark.parametrize("prompt,match", [
    ({"1": {"class_type": "Nope", "inputs": {}}}, "node 1: unknown node type 'Nope'"),
    ({"1": {"class_type": "Load", "inputs": {"name": "a.pt", "extra": 1}}},
     r"node 1 \(Load\): no input\(s\) \['extra'\]"),
    ({"2": {"class_type": "Sample", "inputs": {"model": ["9", 0]}}}, "links to missing node 9"),
    ({"1": {"class_type": "Sample", "inputs": {"model": ["1", 0]}}}, "node 1 is part of a cycle"),
])
def test_bad_prompts_name_the_node(prompt, match):
    with pytest.raises(ValueError, match=match):
        api_to_ui(prompt, INFO)


def test_a_workflow_with_too_few_widget_values_names_the_node_and_input():
    ui = api_to_ui(PROMPT, INFO)
    ui["nodes"][1]["widgets_values"] = [7, "fixed"]
    with pytest.raises(ValueError, match=r"node 2 \(Sample\): no widget value for 'steps'"):
        ui_to_api(ui, INFO)
