"""A screenshot of jetdet's nodes in the real ComfyUI web page: proof that the frontend loads them.

    JETDET_COMFYUI_STUBS=../shared/comfyui/stubs python bench/comfy_screenshot.py --comfyui /path/to/ComfyUI \\
        --out bench/results/comfyui_nodes.png

Starts ComfyUI's server on loopback with jetdet linked into ``custom_nodes`` (as a git clone would be), opens the
page in headless Chromium (Debian's ``chromium`` package), loads a workflow that uses every jetdet node through the
frontend's own ``app.loadApiJson`` (the frontend lays the graph out itself), queues it, waits for it to finish, and
saves a screenshot. Chromium is driven over its DevTools protocol with aiohttp (a ComfyUI requirement), so no
browser-automation package is needed. Prints what the page reported: the jetdet node types the frontend
registered and the prompt's status.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def workflow() -> dict:
    """An API-format prompt with every jetdet node (the same as the server test's, smaller)."""
    ks = dict(seed=1, steps=4, cfg=4.0, sampler_name="euler_ancestral", scheduler="simple")
    both = {"positive": ["2", 0], "negative": ["2", 1]}
    return {
        "1": {"class_type": "JetDetShapesModelLoader", "inputs": {}},
        "2": {"class_type": "JetDetClassConditioning", "inputs": {"class_index": 3}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 4}},
        "4": {"class_type": "JetDetExpertSelector", "inputs": {"model_1": ["1", 0], "prompt": "a plus sign"}},
        "5": {"class_type": "JetDetModeSwitch", "inputs": {"model": ["4", 0], "mode": "deterministic",
                                                            "budget": 0.05, "strict": True}},
        "6": {"class_type": "JetDetDeterministicSampler", "inputs": {"model": ["5", 0], **ks, **both,
                                                                      "latent_image": ["3", 0], "denoise": 1.0,
                                                                      "batch_offset": 0}},
        "7": {"class_type": "JetDetChecksum", "inputs": {"latent": ["6", 0]}},
        "8": {"class_type": "JetDetOutputMatcher", "inputs": {"latent": ["6", 0], "tolerance": "exact",
                                                               "reference_checksums": ["7", 0],
                                                               "stop_on_mismatch": False}},
        "9": {"class_type": "JetDetShapesDecode", "inputs": {"samples": ["6", 0], "scale": 4}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
        "11": {"class_type": "JetDetFastOptimizer", "inputs": {"model": ["1", 0], "budget": 0.1,
                                                                "start_percent": 0.0, "end_percent": 0.0,
                                                                "forecast": "order1", "max_consecutive_skips": 8,
                                                                "linear_attention": "off",
                                                                "attention_cache": False}},
        "12": {"class_type": "JetDetMultiPassRefiner", "inputs": {"model": ["11", 0], **ks, **both,
                                                                   "latent_image": ["3", 0], "coarse_denoise": 1.0,
                                                                   "refine_denoise": 0.5, "detail_denoise": 0.25,
                                                                   "start_pass": "coarse", "end_pass": "detail",
                                                                   "batch_offset": 0}},
        "13": {"class_type": "JetDetCacheManager", "inputs": {"action": "stats", "model": ["11", 0],
                                                               "after": ["12", 0], "device_budget_mb": -1.0,
                                                               "cpu_budget_mb": -1.0, "disk_budget_mb": 0.0}},
        "14": {"class_type": "JetDetBenchmark", "inputs": {"model": ["1", 0], **ks, **both,
                                                            "latent_image": ["3", 0], "denoise": 1.0,
                                                            "fast_budgets": "0.1"}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["14", 1]}},
    }


class DevTools:
    """The few Chrome DevTools protocol calls the screenshot needs, over aiohttp's websocket client."""

    def __init__(self, ws):
        self.ws = ws
        self.n = 0

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str, await_promise: bool = True):
        r = await self.call("Runtime.evaluate", expression=expression, awaitPromise=await_promise,
                            returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")


async def _shoot(url: str, chromium: str, out: Path, width: int, height: int, wait_s: float) -> dict:
    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dport = s.getsockname()[1]
    profile = tempfile.mkdtemp(prefix="jetdet-chromium-")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--remote-debugging-port={dport}", f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            # a fresh profile would open the "Get Started" template dialog over the canvas
            async with http.post(f"{url}/settings/Comfy.TutorialCompleted", json=True) as r:
                r.raise_for_status()
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{dport}/json") as r:
                        pages = [p for p in await r.json() if p.get("type") == "page"]
                    if pages:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.3)
            else:
                raise RuntimeError("Chromium's DevTools endpoint did not come up")
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                dt = DevTools(ws)
                await dt.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                              deviceScaleFactor=1, mobile=False)
                await dt.call("Page.navigate", url=url)
                deadline = time.time() + 120
                while not await dt.js("!!(window.app && window.app.graph && window.app.loadApiJson)"):
                    if time.time() > deadline:
                        raise RuntimeError("the ComfyUI frontend did not finish loading")
                    await asyncio.sleep(0.5)
                registered = await dt.js("Object.keys(LiteGraph.registered_node_types)"
                                         ".filter(k => k.startsWith('JetDet')).sort()")
                await dt.js(f"window.app.loadApiJson({json.dumps(workflow())}, 'jetdet.json')")
                await dt.js("window.app.queuePrompt(0, 1)")
                deadline = time.time() + wait_s
                status = None
                while time.time() < deadline:
                    hist = await dt.js("fetch('/history').then(r => r.json())")
                    done = [h["status"]["status_str"] for h in (hist or {}).values()
                            if h.get("status", {}).get("completed") is not None]
                    if done:
                        status = done[-1]
                        break
                    await asyncio.sleep(1)
                for _ in range(3):  # close any dialog still open
                    for kind in ("keyDown", "keyUp"):
                        await dt.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape",
                                      windowsVirtualKeyCode=27)
                await dt.js("(() => { const c = window.app.canvas; c.ds.scale = 0.62; c.ds.offset = [40, 40];"
                            " c.setDirty(true, true); return 1; })()")
                await asyncio.sleep(1.5)
                shot = await dt.call("Page.captureScreenshot", format="png")
                out.write_bytes(base64.b64decode(shot["data"]))
                return {"registered": registered, "status": status, "png": str(out)}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> dict:
    from jetdet.comfy import shapes_model as sm
    from jetdet.comfy.runtime import find_comfyui, start_server, stop_server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default $COMFYUI_DIR)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "comfyui_nodes.png"))
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1150)
    ap.add_argument("--wait", type=float, default=600, help="seconds to wait for the queued workflow")
    args = ap.parse_args(argv)
    if not os.path.exists(args.chromium):
        raise SystemExit(f"--chromium: {args.chromium} not found (apt-get install chromium)")
    comfy_dir = find_comfyui(args.comfyui)
    base = Path(tempfile.mkdtemp(prefix="jetdet-comfy-shot-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "jetdet").symlink_to(ROOT, target_is_directory=True)
    assert sm.MODEL_FILE.is_file(), sm.MODEL_FILE
    proc, url, log = start_server(base, comfy_dir)
    try:
        res = asyncio.run(_shoot(url, args.chromium, Path(args.out), args.width, args.height, args.wait))
    finally:
        stop_server(proc)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
