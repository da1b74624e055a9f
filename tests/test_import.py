"""``import jetdet`` on a CPU-only machine: no device probing, no triton import, no top-level `kernels`."""

import importlib.metadata
import subprocess
import sys

import pytest

PROBE = """
import sys, torch
calls = []
torch.cuda.is_available = lambda: calls.append("is_available") or False
torch.cuda.device_count = lambda: calls.append("device_count") or 0
torch.cuda.init = lambda: calls.append("init")
import jetdet
print("triton" in sys.modules, torch.cuda.is_initialized(), calls, jetdet.kernels.__name__,
      "kernels" in sys.modules)
"""


def test_import_probes_no_device_and_loads_no_triton():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={"PATH": "", "PYTHONPATH": ":".join(sys.path)}).stdout.split()
    assert out == ["False", "False", "[]", "jetdet.kernels", "False"], out


def test_installed_distribution_has_no_top_level_kernels():
    # the installed wheel (it has a RECORD); a source tree's jetdet.egg-info on sys.path lists the checkout
    dists = [d for d in importlib.metadata.distributions(name="jetdet") if d.read_text("RECORD")]
    if not dists:
        pytest.skip("jetdet is not pip-installed in this environment")
    files = [str(f) for f in (dists[0].files or [])]
    top = {f.split("/")[0] for f in files if f.endswith(".py")}
    if any(".pth" in f or "__editable__" in f for f in files):
        pytest.skip("editable install: files live in the checkout")
    assert "kernels" not in top and "jetdet" in top, sorted(top)
    assert any(f.startswith("jetdet/kernels/matmul/") for f in files)
    assert any(f.startswith("jetdet/autotune_configs/matmul/") and f.endswith(".json") for f in files)


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

SHADOW_PROBE = """
import os, sys
try:
    import kernels
except ImportError as e:
    print("ImportError", e.name)
else:
    print("imported", os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__))) == os.getcwd())
"""


def test_checkout_kernels_folder_never_shadows_a_top_level_kernels():
    # `python -m pytest` / `python -c` from a checkout put the repository root on sys.path; `import kernels` must
    # then give Hugging Face's package (transformers depends on it, diffusers imports it) or fail as if absent,
    # never jetdet's folder (that broke diffusers once ComfyUI's requirements pulled `kernels` in)
    out = subprocess.run([sys.executable, "-c", SHADOW_PROBE], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    installed = any(True for _ in importlib.metadata.distributions(name="kernels"))
    assert out == (["imported", "False"] if installed else ["ImportError", "kernels"]), out


def test_jetdet_and_jetdet_comfy_import_no_comfyui():
    probe = ("import sys, jetdet, jetdet.comfy, jetdet.comfy.runtime, jetdet.comfy.shapes_model; print(sorted(m for m "
             "in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'nodes', 'folder_paths')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_pyproject_lists_every_package():
    """setuptools gets an explicit package list (kernels/ is mapped under jetdet): a package missing there is
    missing from every pip install (jetdet.comfy and a new kernel folder once were), so the list must be every
    folder with an __init__.py under jetdet/, kernels/ and autotune_configs/."""
    import os

    import tomllib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    roots = (("jetdet", "jetdet"), ("kernels", "jetdet.kernels"), ("autotune_configs", "jetdet.autotune_configs"))
    for top, name in roots:
        for root, dirs, files in os.walk(os.path.join(repo, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(root, os.path.join(repo, top))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert found == listed, {"not in pyproject": sorted(found - listed), "listed, no package": sorted(listed - found)}
