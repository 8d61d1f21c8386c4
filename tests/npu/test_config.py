"""The machine's numbers: presets, JSON configs, derived figures."""

import dataclasses
import json

import pytest

from isthmus.errors import NpuError
from isthmus.npu.config import PRESETS, NpuConfig, load_config


def test_presets():
    core, chip, edge, dc = (load_config(n) for n in ("core", "chip", "edge", "datacenter"))
    assert load_config() is core
    assert (core.partitions, core.sbuf_bytes, core.psum_bytes, core.pe_rows, core.pe_cols) == \
        (128, 24 << 20, 2 << 20, 128, 128)
    assert core.moving_max == 512 and core.peak_flops == 2 * 128 * 128 * 1.4e9
    # a core has 1/8 of Trainium2's 2.9 TB/s and 96 GiB; the chip is 8 such cores sharing them
    assert core.hbm_bytes_per_s == 2.9e12 / 8 and core.hbm_capacity_bytes == 12 << 30 and core.cores == 1
    assert (chip.cores, chip.hbm_bytes_per_s, chip.hbm_capacity_bytes) == (8, 2.9e12, 96 << 30)
    assert chip.hbm_bytes_per_cycle == core.hbm_bytes_per_cycle            # each core streams its share
    assert chip.link_bytes_per_s == 3.5e12 / 8 and chip.link_latency_cycles > chip.dma_latency_cycles
    for f in dataclasses.fields(NpuConfig):                                 # a chip core is a core
        if f.name not in ("name", "cores", "hbm_bytes_per_s", "hbm_capacity_bytes"):
            assert getattr(chip, f.name) == getattr(core, f.name), f.name
    # the legacy preset: the core with the whole chip's bandwidth, kept so old figures reproduce
    assert dc.hbm_bytes_per_cycle == 8 * core.hbm_bytes_per_cycle and dc.partitions == core.partitions
    assert edge.partitions < core.partitions and edge.hbm_bytes_per_s < core.hbm_bytes_per_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        core.partitions = 64
    assert set(PRESETS) == {"core", "chip", "edge", "datacenter"}


def test_json_config_overrides_the_core_values(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"partitions": 64, "pe_rows": 64, "pe_cols": 64, "clock_hz": 2e9, "dma_queues": 4.0}))
    cfg = load_config(path)
    assert (cfg.name, cfg.partitions, cfg.clock_hz, cfg.dma_queues) == ("mine", 64, 2e9, 4)
    assert cfg.sbuf_bytes_per_partition == NpuConfig().sbuf_bytes_per_partition
    assert cfg.hbm_bytes_per_s == load_config("core").hbm_bytes_per_s
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
