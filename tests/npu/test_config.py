"""The machine's numbers: presets, JSON configs, derived figures."""

import dataclasses
import json

import pytest

from isthmus.errors import NpuError
from isthmus.npu.config import PRESETS, NpuConfig, load_config


def test_presets():
    dc, edge = load_config("datacenter"), load_config("edge")
    assert load_config() is dc
    assert (dc.partitions, dc.sbuf_bytes, dc.psum_bytes, dc.pe_rows, dc.pe_cols) == (128, 24 << 20, 2 << 20, 128, 128)
    assert dc.moving_max == 512 and dc.peak_flops == 2 * 128 * 128 * 1.4e9
    assert edge.partitions < dc.partitions and edge.hbm_bytes_per_s < dc.hbm_bytes_per_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        dc.partitions = 64
    assert set(PRESETS) == {"datacenter", "edge"}


def test_json_config_overrides_the_datacenter_values(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"partitions": 64, "pe_rows": 64, "pe_cols": 64, "clock_hz": 2e9, "dma_queues": 4.0}))
    cfg = load_config(path)
    assert (cfg.name, cfg.partitions, cfg.clock_hz, cfg.dma_queues) == ("mine", 64, 2e9, 4)
    assert cfg.sbuf_bytes_per_partition == NpuConfig().sbuf_bytes_per_partition
    assert NpuConfig(**json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("content,needle", [
    ("{", "not a readable JSON NPU config"),
    ("[1]", "a JSON object"),
    ('{"colour": 1}', "unknown NPU config field(s) colour"),
    ('{"partitions": 0}', "partitions must be a positive number"),
    ('{"partitions": 64}', "PE array (128x128) is larger than the 64 partitions"),
    ('{"dma_queues": 2.5}', "dma_queues must be an integer"),
    ('{"psum_bank_bytes": 3000}', "not a whole number of banks"),
])
def test_bad_json_configs(tmp_path, content, needle):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(NpuError, match=None) as e:
        load_config(path)
    assert needle in str(e.value)


def test_unknown_names():
    with pytest.raises(NpuError, match="unknown NPU config 'tpu'"):
        load_config("tpu")
    with pytest.raises(NpuError, match="no such file"):
        load_config("/nonexistent/x.json")
