"""Write ``example_workflows/*.json``, the workflows ComfyUI lists for jetdet under Browse Templates, from their
API-format definitions (``jetdet.comfy.workflows.EXAMPLES``) and the node definitions of a real ComfyUI server.

    JETDET_COMFYUI_STUBS=$PWD/../shared/comfyui/stubs python bench/comfy_workflows.py --comfyui /path/to/ComfyUI

Starts ComfyUI's server on loopback with jetdet linked into ``custom_nodes`` (as a git clone is), reads
``/object_info`` and lays each workflow out in the UI format (``jetdet.comfy.workflows.api_to_ui``).
``tests/comfy/test_comfy_server.py`` checks that the files are what this writes and runs them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetdet.comfy.runtime import start_server, stop_server  # noqa: E402
from jetdet.comfy.workflows import EXAMPLES, api_to_ui  # noqa: E402

OUT = ROOT / "example_workflows"


def write_all(object_info: dict, out: Path = OUT) -> list[Path]:
    out.mkdir(exist_ok=True)
    paths = []
    for name, (prompt, titles) in EXAMPLES.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps(api_to_ui(prompt, object_info, titles), indent=1) + "\n")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", help="the ComfyUI folder (default: $COMFYUI_DIR)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as base:
        (Path(base) / "custom_nodes").mkdir()
        (Path(base) / "custom_nodes" / "jetdet").symlink_to(ROOT, target_is_directory=True)
        proc, url, _ = start_server(base, args.comfyui)
        try:
            with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
                info = json.loads(r.read())
        finally:
            stop_server(proc)
    for path in write_all(info):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
