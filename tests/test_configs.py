"""Launch tables: nearest-key lookup, $JETDET_CONFIG_DIR override, default + one-time warning, shipped
tables parse, and (deterministic rule) the config never depends on the batch dimension."""

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
