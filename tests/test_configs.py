"""Launch tables: nearest-key lookup, $JETDET_CONFIG_DIR override, default + one-time warning, shipped
tables parse, and (deterministic rule) the config never depends on the batch dimension."""

import copy
import json
import os
import warnings

import pytest
import torch

from jetdet import _paths, configs

DEFAULT = {"BLOCK": 16, "num_warps": 4}


@pytest.fixture(autouse=True)
def _fresh():
    configs.clear_cache()
    yield
    configs.clear_cache()


def _write(tmp_path, op, name, table):
    d = tmp_path / op
    d.mkdir(parents=True, exist_ok=True)
    (d / f"device_name={name}.json").write_text(json.dumps(table))


def test_nearest_key_and_override(tmp_path, monkeypatch):
    _write(tmp_path, "toy", "interpreter", {"64": {"BLOCK": 64}, "256": {"BLOCK": 256}, "1024": {"BLOCK": 1024}})
    monkeypatch.setenv("JETDET_CONFIG_DIR", str(tmp_path))
    get = lambda k: configs.get_config("toy", k, dtype=torch.float32, default=DEFAULT)  # noqa: E731
    assert get(64)["BLOCK"] == 64
    assert get(100)["BLOCK"] == 64  # log2 distance: 100 is nearer 64 than 256
    assert get(200)["BLOCK"] == 256
    assert get(100000)["BLOCK"] == 1024
    assert get(1)["BLOCK"] == 64
    assert get(300)["num_warps"] == 4  # missing fields come from the default


def test_dtype_and_arch_files(tmp_path, monkeypatch):
    _write(tmp_path, "toy", "sm_80", {"1": {"BLOCK": 8}})
    _write(tmp_path, "toy", "sm_80,dtype=fp16", {"1": {"BLOCK": 32}})
    monkeypatch.setenv("JETDET_CONFIG_DIR", str(tmp_path))
    assert configs.get_config("toy", 5, dtype=torch.float16, default=DEFAULT)["BLOCK"] == 32
    assert configs.get_config("toy", 5, dtype=torch.float32, default=DEFAULT)["BLOCK"] == 8


def test_default_with_one_time_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("JETDET_CONFIG_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="no launch table for op 'nothing'"):
        assert configs.get_config("nothing", 8, dtype=torch.float32, default=DEFAULT) == DEFAULT
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configs.get_config("nothing", 9, dtype=torch.float32, default=DEFAULT)  # no second warning


def test_bad_table_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "device_name=interpreter.json").write_text("[]")
    monkeypatch.setenv("JETDET_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="expected a non-empty JSON object"):
        configs.get_config("toy", 8, dtype=torch.float32, default=DEFAULT)


def test_shipped_tables_parse_and_cover_a100_h100():
    root = _paths.configs_dir()
    ops = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("_")]
    assert {"matmul", "attention"} <= set(ops)
    for op in ops:
        files = os.listdir(os.path.join(root, op))
        for f in files:
            table = json.load(open(os.path.join(root, op, f)))
            assert isinstance(table, dict) and table, f
            for key, cfg in table.items():
                assert key == "default" or key.isdigit(), (op, f, key)
                assert isinstance(cfg, dict)
        names = " ".join(files)
        assert "sm_80" in names and "sm_90" in names, (op, files)


def test_table_archs_one_rule():
    """One rule for where a shipped table runs (what the static report compiles it for): a table named after a
    known device on that device's arch, ``sm_XY`` on sm_XY, any other on all three; every shipped device-named
    table is a known device, so none is compiled for an arch it never runs on."""
    assert configs.table_archs("NVIDIA_A100-SXM4-80GB") == (80,)
    assert configs.table_archs("NVIDIA_H100_80GB_HBM3") == configs.table_archs("NVIDIA_H200") == (90,)
    assert configs.table_archs("sm_89") == (89,)
    assert configs.table_archs("sm_86") == configs.table_archs("NVIDIA_RTX_A6000") == configs.ARCHS == (80, 89, 90)
    root = _paths.configs_dir()
    for op in (d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("_")):
        tables = configs.shipped_tables(op)
        assert tables, op
        for ident, archs, dn, _table in tables:
            assert ident.startswith("sm_") or ident in configs.DEVICE_ARCHS, (op, ident)
            assert archs == configs.table_archs(ident) and dn in configs.DTYPES


def test_shipped_tables_pick_what_find_table_picks(tmp_path, monkeypatch):
    """A ``,dtype=`` file serves its dtype, the plain file the others; shipped_configs adds the default on every
    arch and merges equal configs across tables."""
    _write(tmp_path, "toy", "sm_80", {"1": {"BLOCK": 8}})
    _write(tmp_path, "toy", "sm_80,dtype=fp16", {"1": {"BLOCK": 32}})
    _write(tmp_path, "toy", "NVIDIA_H200", {"1": {"BLOCK": 8}})
    monkeypatch.setenv("JETDET_CONFIG_DIR", str(tmp_path))
    got = [(ident, archs, dn, table["1"]["BLOCK"]) for ident, archs, dn, table in configs.shipped_tables("toy")]
    assert got == [
        ("NVIDIA_H200", (90,), "fp32", 8), ("NVIDIA_H200", (90,), "fp16", 8), ("NVIDIA_H200", (90,), "bf16", 8),
        ("sm_80", (80,), "fp32", 8), ("sm_80", (80,), "fp16", 32), ("sm_80", (80,), "bf16", 8),
    ]  # fmt: skip
    merged = configs.shipped_configs("toy", (torch.float32, torch.float16), lambda dt: dict(DEFAULT))
    assert merged == [
        (torch.float32, DEFAULT, (80, 89, 90)),
        (torch.float32, {**DEFAULT, "BLOCK": 8}, (80, 90)),
        (torch.float16, DEFAULT, (80, 89, 90)),
        (torch.float16, {**DEFAULT, "BLOCK": 8}, (90,)),
        (torch.float16, {**DEFAULT, "BLOCK": 32}, (80,)),
    ]
    assert configs.shipped_tables("nothing") == []
    assert configs.shipped_tables("nothing", default=DEFAULT) == [("default", (80, 89, 90), dn, DEFAULT) for dn in
                                                                  ("fp32", "fp16", "bf16")]  # fmt: skip


def _as_gpu(monkeypatch, name, capability=(9, 0)):
    """Make configs.device_identity see a CUDA device called ``name`` (as torch reports it)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    return torch.device("cuda")


def test_h200_name_finds_the_h200_tables(monkeypatch):
    """torch calls it "NVIDIA H200"; the tables are device_name=NVIDIA_H200 (the H200 run of issue 13 found none
    and fell back to sm_90). Dtypes without an H200 file, and other names, still reach the sm_90 tables."""
    dev = _as_gpu(monkeypatch, "NVIDIA H200")
    _, path = configs.find_table("matmul", torch.bfloat16, dev)
    assert path.endswith(os.path.join("matmul", "device_name=NVIDIA_H200,dtype=bf16.json")), path
    cfg = configs.get_config("matmul", 3072, dtype=torch.bfloat16, device=dev, default={})
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"]) == (128, 128, 64, 8, 3)
    _, path = configs.find_table("matmul", torch.float16, dev)
    assert path.endswith(os.path.join("matmul", "device_name=sm_90.json")), path
    _, path = configs.find_table("conv2d", torch.bfloat16, _as_gpu(monkeypatch, "NVIDIA H200 NVL"))
    assert path.endswith(os.path.join("conv2d", "device_name=NVIDIA_H200,dtype=bf16.json")), path
    # negative control: a name with no table of its own (or of its prefix) uses the arch's
    _, path = configs.find_table("matmul", torch.bfloat16, _as_gpu(monkeypatch, "NVIDIA H100 PCIe"))
    assert path.endswith("device_name=sm_90.json"), path
    assert configs.name_candidates("NVIDIA_H100_80GB_HBM3")[-1] == "NVIDIA_H100"


def test_attention_masked_subentry(monkeypatch):
    """The H200 bf16 attention table gives calls without a mask the measured tile (M64 N64, 4 warps, 3 stages) and,
    at head dims 72-128, masked calls the sm_90 tile (the measured one spills with a mask there); other dtypes and
    devices have one tile for both. A malformed 'masked' sub-entry is an error naming it."""
    from jetdet.kernels.attention import launch

    dev = _as_gpu(monkeypatch, "NVIDIA H200")
    tile = lambda c: (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])  # noqa: E731
    assert tile(launch.config(128, torch.bfloat16, dev)) == (64, 64, 4, 3)
    assert tile(launch.config(128, torch.bfloat16, dev, masked=True)) == (64, 32, 8, 3)
    # at head dim 64 the measured tile does not spill with a mask on sm_90: one tile for both
    assert tile(launch.config(64, torch.bfloat16, dev)) == tile(launch.config(64, torch.bfloat16, dev, masked=True)) \
        == (64, 64, 4, 3)
    for masked in (False, True):
        assert "masked" not in launch.config(128, torch.bfloat16, dev, masked=masked)
        # negative control: fp16 on the H200 and bf16 on an H100 have no masked tile of their own
        assert tile(launch.config(128, torch.float16, dev, masked=masked)) == (64, 32, 8, 3)
        assert tile(launch.config(128, torch.bfloat16, _as_gpu(monkeypatch, "NVIDIA H100 PCIe"), masked=masked)) == (
            64, 32, 8, 3)
    with pytest.raises(ValueError, match="'masked'"):
        launch.resolve({"BLOCK_M": 64, "masked": {"BLOCK_K": 3}}, True)


def _provenance():
    with open(os.path.join(_paths.configs_dir(), "PROVENANCE.json")) as f:
        return json.load(f)["files"]


def _provenance_errors(files: dict) -> list[str]:
    """Problems of a PROVENANCE.json "files" mapping against the shipped tables (empty: all accounted for)."""
    root = _paths.configs_dir()
    on_disk = sorted(
        f"{op}/{f}" for op in os.listdir(root) if os.path.isdir(os.path.join(root, op)) and not op.startswith("_")
        for f in os.listdir(os.path.join(root, op)) if f.endswith(".json")
    )  # fmt: skip
    errors = [f"{rel}: no provenance" for rel in on_disk if rel not in files]
    errors += [f"{rel}: provenance of a file that does not exist" for rel in files if rel not in on_disk]
    for rel in sorted(set(on_disk) & set(files)):
        with open(os.path.join(root, rel)) as f:
            table = json.load(f)
        errors += [f"{rel}: {k}: provenance of a key not in the table" for k in files[rel].get("entries", {})
                   if k not in table]  # fmt: skip
        for key, cfg in table.items():
            src = files[rel].get("entries", {}).get(key, files[rel]["default"])
            if src["status"] not in ("static report", "measured", "carried over"):
                errors.append(f"{rel}: {key}: unknown status {src['status']!r}")
            elif src["status"] == "measured" and not src.get("source"):
                errors.append(f"{rel}: {key}: measured, but no source")
            elif src["status"] == "carried over":
                with open(os.path.join(root, src["from"])) as f:
                    origin = json.load(f).get(src.get("key", key))
                if origin != cfg:
                    errors.append(f"{rel}: {key}: carried over from {src['from']}, but differs from {origin}")
    return errors


def test_every_table_entry_says_where_it_comes_from():
    """autotune_configs/PROVENANCE.json names every table file; each entry is 'static report', 'measured' (with
    the run it was timed on) or 'carried over', and a carried-over entry is identical to the one it copies."""
    files = _provenance()
    assert _provenance_errors(files) == []
    measured = [
        (rel, key)
        for rel, info in files.items()
        for key, src in info.get("entries", {}).items()
        if src["status"] == "measured"
    ]
    assert len(measured) == 4 and all("NVIDIA_H200" in rel for rel, _ in measured), measured


def test_provenance_check_catches_a_wrong_copy():
    """Negative controls: a measured H200 entry relabelled as carried over from sm_90, and a table file left
    out, are both reported."""
    files = copy.deepcopy(_provenance())
    rel = "matmul/device_name=NVIDIA_H200,dtype=bf16.json"
    files[rel]["entries"]["3072"] = {"status": "carried over", "from": "matmul/device_name=sm_90.json", "key": "2048"}
    del files["norms/device_name=sm_90.json"]
    errors = _provenance_errors(files)
    assert any(e.startswith(f"{rel}: 3072: carried over") for e in errors), errors
    assert "norms/device_name=sm_90.json: no provenance" in errors


@pytest.mark.parametrize("op_name", ["linear", "attention", "layer_norm", "conv2d", "softmax"])
def test_config_key_never_depends_on_batch(op_name, monkeypatch, triton_backend):
    """Spy on every get_config call made while running the Triton path at batch 1 and batch 5: the
    (op, key, dtype) triples must be identical, so every item runs under the same config."""
    import jetdet

    seen = []
    orig = configs.get_config

    def spy(op, key, **kw):
        seen.append((op, key, kw.get("dtype")))
        return orig(op, key, **kw)

    monkeypatch.setattr(configs, "get_config", spy)
    calls = {
        "linear": lambda b: jetdet.ops.linear(torch.randn(b, 5, 24), torch.randn(16, 24)),
        "attention": lambda b: jetdet.ops.attention(*(torch.randn(b, 2, 9, 16),) * 3),
        "layer_norm": lambda b: jetdet.ops.layer_norm(torch.randn(b, 3, 40), (40,)),
        "conv2d": lambda b: jetdet.ops.conv2d(torch.randn(b, 3, 6, 6), torch.randn(4, 3, 3, 3), padding=1),
        "softmax": lambda b: jetdet.ops.softmax(torch.randn(b, 3, 33)),
    }
    per_batch = []
    for b in (1, 5):
        seen.clear()
        calls[op_name](b)
        per_batch.append(list(seen))
    assert per_batch[0], "the Triton path did not look up a config"
    assert per_batch[0] == per_batch[1]
