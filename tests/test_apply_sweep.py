"""bench/apply_sweep.py: a gpu_check sweep becomes table entries with provenance, only where the best tile beat the
shipped one and only after the static report passes it; a tile the static report rejects (negative control: shared
memory over sm_90's limit) is listed as not shipped and the table is left alone."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from test_configs import _provenance_errors

from jetdet import _paths, configs

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("apply_sweep", ROOT / "bench" / "apply_sweep.py")
apply_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(apply_sweep)

GOOD = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
# 5 stages of 256x256 and 256x128 bf16 tiles: about 640 KB of shared memory, far over sm_90's 227 KB
TOO_BIG = {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 5}


def _result(device="NVIDIA H200", sweep=True) -> dict:
    speed = [
        {"label": "linear 8192x3072->3072", "kind": "linear", "dtype": "bfloat16", "jetdet_ms": 1.00},
        {"label": "linear 512x3072->18432", "kind": "linear", "dtype": "bfloat16", "jetdet_ms": 1.00},
        {"label": "attention D64 B2 H24 N4096", "kind": "attention", "dtype": "bfloat16", "jetdet_ms": 1.00},
    ]
    rows = [
        {"label": "linear 8192x3072->3072", "op": "matmul", "dtype": "bfloat16", "key": 3072,
         "best": {"config": GOOD, "ms": 0.80}},
        {"label": "linear 512x3072->18432", "op": "matmul", "dtype": "bfloat16", "key": 18432,
         "best": {"config": TOO_BIG, "ms": 0.70}},
        {"label": "attention D64 B2 H24 N4096", "op": "attention", "dtype": "bfloat16", "key": 64,
         "best": {"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, "ms": 0.99}},
        {"label": "attention D64 B2 H24 N4096", "op": "attention_tma", "dtype": "bfloat16", "key": 64,
         "best": {"config": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}, "ms": 0.60}},
    ]  # fmt: skip
    env = {"device_name": device, "capability": [9, 0], "torch": "2.11.0+cu130", "triton": "3.6.0", "commit": "abc1234"}
    return {"when": "2026-12-06 03:00:00", "sections": {"environment": env, "speed": {"rows": speed},
                                                          "sweep": {"rows": rows if sweep else []}}}  # fmt: skip


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """A copy of the shipped tables, which the lookups read while the test runs."""
    dst = tmp_path / "configs"
    shutil.copytree(_paths.configs_dir(), dst, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("JETDET_CONFIG_DIR", str(dst))
    configs.clear_cache()
    yield dst
    configs.clear_cache()


def _run(tmp_path, result, *args) -> int:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(result))
    return apply_sweep.main([str(path), *args])


def _prov(tables) -> dict:
    return json.loads((tables / "PROVENANCE.json").read_text())


@pytest.mark.slow
def test_faster_tiles_are_written_with_provenance_and_rejected_ones_are_not(tmp_path, tables, capsys):
    rel = "matmul/device_name=NVIDIA_H200,dtype=bf16.json"
    before = json.loads((tables / rel).read_text())
    assert _run(tmp_path, _result(), "--config-dir", str(tables)) == 0
    out = capsys.readouterr().out
    after = json.loads((tables / rel).read_text())
    assert after["3072"] == GOOD and "18432" not in after  # the slower-than-limit tile was not written
    assert {k: v for k, v in after.items() if k != "3072"} == {k: v for k, v in before.items() if k != "3072"}
    prov = _prov(tables)
    src = prov["files"][rel]["entries"]["3072"]
    assert src["status"] == "measured" and "0.800 ms against 1.000 ms" in src["source"] and "abc1234" in src["source"]
    rejected = [r for r in prov["not_shipped"] if r["config"] == TOO_BIG]
    assert len(rejected) == 1 and rejected[0]["why"].startswith("static report: "), prov["not_shipped"]
    assert "rejected by the static report" in out
    assert "attention D64 B2 H24 N4096: shipped tile kept" in out  # 0.99 ms is within the 3 % margin
    assert "launch_tma.CONFIGS (code), not a table" in out  # the TMA kernel's sweep: printed only
    assert _provenance_errors(prov["files"]) == []  # every table entry still says where it comes from


def test_a_device_without_a_file_for_the_dtype_gets_a_copy_of_the_one_it_used(tmp_path, tables):
    """The H100 has a plain table serving fp16 and bf16: the bf16 entries go to a new ``,dtype=bf16`` file that
    starts as a copy of it (carried over), so no other key of the device changes (without the static check here,
    both swept tiles are written)."""
    assert _run(tmp_path, _result("NVIDIA H100 80GB HBM3"), "--config-dir", str(tables), "--no-static-check") == 0
    origin = json.loads((tables / "matmul/device_name=NVIDIA_H100_80GB_HBM3.json").read_text())
    new = json.loads((tables / "matmul/device_name=NVIDIA_H100_80GB_HBM3,dtype=bf16.json").read_text())
    assert new == {**origin, "3072": GOOD, "18432": TOO_BIG}
    prov = _prov(tables)
    info = prov["files"]["matmul/device_name=NVIDIA_H100_80GB_HBM3,dtype=bf16.json"]
    assert info["default"] == {"status": "carried over", "from": "matmul/device_name=NVIDIA_H100_80GB_HBM3.json"}
    assert _provenance_errors(prov["files"]) == []


def test_dry_run_writes_nothing_and_a_run_without_a_sweep_says_so(tmp_path, tables, capsys):
    snapshot = {p: p.read_bytes() for p in tables.rglob("*.json")}
    assert _run(tmp_path, _result(), "--config-dir", str(tables), "--dry-run") == 0
    assert "would write matmul/device_name=NVIDIA_H200,dtype=bf16.json [3072]" in capsys.readouterr().out
    assert _run(tmp_path, _result(sweep=False), "--config-dir", str(tables)) == 2
    assert "no sweep in this run" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in tables.rglob("*.json")} == snapshot
    with pytest.raises(SystemExit):
        _run(tmp_path, _result(), "--margin", "1.5")
    assert "--margin: expected a fraction in [0, 1)" in capsys.readouterr().err


def test_the_shipped_tables_are_read_back_in_their_own_format(tables):
    """apply_sweep writes tables and PROVENANCE.json in the shipped files' own formats, so a run's diff is its
    entries only."""
    for rel in ("PROVENANCE.json", "matmul/device_name=NVIDIA_H200,dtype=bf16.json"):
        text = (tables / rel).read_text()
        apply_sweep._write_json(os.fspath(tables / rel), json.loads(text))
        assert (tables / rel).read_text() == text, rel
