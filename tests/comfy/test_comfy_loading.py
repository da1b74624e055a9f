"""How ComfyUI loads jetdet: a git clone in custom_nodes/jetdet (the root __init__.py), a pip install through the
one-line shim, and the Registry metadata in pyproject.toml. Each load runs in a fresh process, as ComfyUI would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib
from conftest import ROOT, comfyui_dir, require_comfyui

require_comfyui()

from jetdet.comfy import NODE_IDS

LOADER = """
import asyncio, json, sys
sys.path.insert(0, {comfy!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import utils
import nodes
ok = asyncio.run(nodes.load_custom_node({path!r}))
import jetdet
ids = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("JetDet"))
cats = sorted({{nodes.NODE_CLASS_MAPPINGS[k].GET_SCHEMA().category for k in ids}})
print(json.dumps({{"ok": ok, "ids": ids, "categories": cats, "jetdet": jetdet.__file__,
                   "comfy_in_jetdet_import": None}}))
"""


def _load_in_fresh_process(path: Path, pythonpath: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath + [p for p in sys.path if "stubs" in p])
    env.pop("COMFYUI_DIR", None)
    out = subprocess.run([sys.executable, "-c", LOADER.format(comfy=comfyui_dir(), path=str(path))],
                         capture_output=True, text=True, env=env, cwd=str(path.parent), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_git_clone_in_custom_nodes_loads_through_the_root_init(tmp_path):
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    clone = custom / "jetdet"
    clone.symlink_to(ROOT, target_is_directory=True)
    res = _load_in_fresh_process(clone, [])
    assert res["ok"] and res["ids"] == sorted(NODE_IDS) and res["categories"] == ["jetdet"]
    # the clone's own package, even when another jetdet is installed in the environment
    assert res["jetdet"] == str(clone / "jetdet" / "__init__.py")


def test_pip_install_loads_through_the_one_line_shim(tmp_path):
    shim = tmp_path / "custom_nodes" / "jetdet_nodes"
    shim.mkdir(parents=True)
    readme = (ROOT / "README.md").read_text()
    line = "from jetdet.comfy import comfy_entrypoint  # noqa: F401"
    assert line in readme, "the README documents the shim"
    (shim / "__init__.py").write_text(line + "\n")
    res = _load_in_fresh_process(shim, [str(ROOT)])  # jetdet importable as if pip-installed
    assert res["ok"] and res["ids"] == sorted(NODE_IDS)
    assert Path(res["jetdet"]).resolve() == (ROOT / "jetdet" / "__init__.py").resolve()


def test_registry_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    assert meta["project"]["name"] == "jetdet" and meta["project"]["version"]
    assert "Repository" in meta["project"]["urls"]
