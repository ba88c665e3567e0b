"""HF safetensors directories: the lazy reader against ``safetensors.safe_open``, the sharded
writer against ``safe_open`` + the index format, and broken inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantbench.errors import FormatError, QuantbenchError
from quantbench.formats.safetensors_dir import (
    INDEX_NAME,
    Entry,
    SafetensorsModel,
    read_header,
    resolve_model_dir,
    tensor_entry,
    write_model_dir,
)


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a.f32": torch.randn(5, 7, generator=g),
        "b.bf16": torch.randn(3, 64, generator=g).bfloat16(),
        "c.f16": torch.randn(4, generator=g).half(),
        "d.i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.u8": torch.arange(10, dtype=torch.uint8),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(3.5),
        "h.e4m3": torch.randn(8, 4, generator=g).to(torch.float8_e4m3fn),
    }


def test_reader_matches_safe_open(tmp_path):
    ts = _mixed()
    save_file(ts, str(tmp_path / "model.safetensors"))
    with SafetensorsModel(tmp_path) as m, safe_open(str(tmp_path / "model.safetensors"), "pt") as ref:
        assert sorted(m.names()) == sorted(ref.keys())
        for name in ref.keys():
            got, want = m.read(name), ref.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
        seen = dict(m)  # iteration yields every tensor once
        assert sorted(seen) == sorted(ts)
        rows = m.read_rows("a.f32", 1, 4)
        assert torch.equal(rows, ts["a.f32"][1:4])


def test_sharded_writer_round_trip_and_index(tmp_path):
    ts = {f"model.layers.{i}.w": torch.randn(32, 16) for i in range(6)}
    out = tmp_path / "m"
    files = write_model_dir(out, [tensor_entry(k, v) for k, v in ts.items()], max_shard_bytes=3000,
                            extra_files={"config.json": b"{}"})
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 6 and shards[0] == "model-00001-of-00006.safetensors"  # 2048-byte tensors, 3000-byte cap
    assert index["metadata"]["total_size"] == 6 * 32 * 16 * 4
    assert {p.name for p in files} == {*shards, INDEX_NAME, "config.json"}
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as f:
            assert torch.equal(f.get_tensor(name), ts[name])
    with SafetensorsModel(out) as m:
        assert len(m.files) == 6
        assert all(torch.equal(t, ts[n]) for n, t in m)
    # one shard: plain model.safetensors, no index
    out1 = tmp_path / "one"
    write_model_dir(out1, [tensor_entry(k, v) for k, v in ts.items()])
    assert sorted(p.name for p in out1.iterdir()) == ["model.safetensors"]


def test_writer_failure_leaves_nothing(tmp_path):
    def boom():
        yield torch.zeros(4)
        raise RuntimeError("disk on fire")

    entries = [tensor_entry("ok", torch.ones(4)), Entry("bad", "F32", (8,), boom)]
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_model_dir(out, entries, max_shard_bytes=16, extra_files={"config.json": b"{}"})
    assert not out.exists() or list(out.iterdir()) == []


def test_writer_rejects_wrong_byte_count(tmp_path):
    with pytest.raises(FormatError, match="produced 8 bytes, header says 16"):
        write_model_dir(tmp_path / "m", [Entry("x", "F32", (4,), lambda: [torch.zeros(2)])])
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_duplicate_key_across_shards_names_both(tmp_path):
    save_file({"w": torch.zeros(2), "a": torch.zeros(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"w": torch.ones(2), "b": torch.ones(1)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {
        "w": "model-00001-of-00002.safetensors", "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FormatError, match=r"'w' appears in two shards: .*00001-of-00002.* and .*00002-of-00002"):
        SafetensorsModel(tmp_path)


def test_truncated_shard(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(FormatError, match=r"truncated: tensors need \d+ bytes, file has \d+"):
        SafetensorsModel(tmp_path)
    with pytest.raises(Exception):  # the reference library refuses it too
        safe_open(str(p), "pt")
    p.write_bytes(data[:5])
    with pytest.raises(FormatError, match="not a safetensors file"):
        read_header(p)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors",
                                                                  "v": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(FormatError, match="index maps 'v' to model-00001-of-00001.safetensors, which does not hold it"):
        SafetensorsModel(tmp_path)


def test_index_with_missing_shard(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors",
                                                                  "v": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FormatError, match="missing: model-00002-of-00002.safetensors"):
        SafetensorsModel(tmp_path)


def test_hub_id_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(QuantbenchError, match=r"quantbench-test/does-not-exist.*HF_HUB_OFFLINE"):
        resolve_model_dir("quantbench-test/does-not-exist")
    with pytest.raises(QuantbenchError, match="no such file"):
        resolve_model_dir(os.fspath(tmp_path / "nope" / "deeper" / "x"))
