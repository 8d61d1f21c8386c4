"""Every number of the modeled NPU, in one frozen dataclass (the machine's single source of truth).

The ISA (`isa.py`) fixes what can be *encoded*; a config fixes what a given machine *has*: the
simulator checks capacities and bounds against it, the timing model takes every cost constant
from it, and docs/npu-isa.md prints the presets. Nothing else in `isthmus.npu` holds a hardware
number.

Presets (the source of each number is on its line below):

- ``core`` (the default): one Trainium2 NeuronCore-v3 with its 1/8 share of the chip's HBM.
  128 partitions, 24 MiB SBUF, 2 MiB PSUM in 8 banks of 2 KiB per partition, a 128x128 PE array,
  ~1.4 GHz, 16 DMA queues (AWS Neuron architecture docs for NeuronCore-v3 / the NKI programming
  model). A Trainium2 device has 8 NeuronCores sharing 4 HBM stacks of 96 GiB and 2.9 TB/s in all
  (Neuron docs, "Trainium2 Architecture Guide for NKI"), so one core's share is 362.5 GB/s and 12 GiB.
  Fixed overheads and the DMA latency are model choices of the right order (an HBM access ~
  100-200 ns, a few tens of cycles to issue an engine instruction), not measured Trainium figures.
- ``chip``: the whole Trainium2 device: ``cores`` = 8 such cores, each with its own SBUF, PSUM,
  engines and 16 DMA queues, sharing the 2.9 TB/s and 96 GiB of HBM (a program on one core gets
  ``hbm_bytes_per_s / cores``: the model assumes every core streams), plus the on-chip fabric the
  cores' DMA engines move data between cores over (collectives): the device's 3.5 TB/s of DMA
  bandwidth (same Neuron page, "Data Movement"), 1/8 of it per core, and a core-to-core latency
  of twice the HBM one (a model choice: a hop through the fabric plus the remote semaphore).
- ``edge``: a small NPU in the spirit of Gemmini's default configuration and phone-class NPUs:
  32 partitions, 512 KiB scratchpad, 64 KiB accumulator, a 32x32 array at 1 GHz, LPDDR4X-class
  DRAM at 25.6 GB/s (a 64-bit LPDDR4X-3200 channel), 8 GiB of it, 2 DMA queues, a higher DRAM latency.
- ``datacenter`` (legacy): ``core`` with the *whole chip's* 2.9 TB/s and 96 GiB given to one core,
  the default before the ``core``/``chip`` split. It is kept, unchanged, so that scripts and
  figures that name it reproduce (docs/npu-performance.md's earlier tables), but it is optimistic
  by 8x in bandwidth for a core when the chip is busy; use ``core`` or ``chip``.

`load_config("edge")`, `load_config("path/to/my.json")` (a JSON object with the field names below;
missing fields take the ``core`` values, unknown fields are an error).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from isthmus.errors import NpuError


@dataclass(frozen=True)
class NpuConfig:
    name: str = "core"
    # -- memories -------------------------------------------------------------------------------
    partitions: int = 128                    # SBUF/PSUM partitions = vector/act lanes = PE rows
    sbuf_bytes_per_partition: int = 196_608  # 24 MiB / 128
    psum_bytes_per_partition: int = 16_384   # 2 MiB / 128
    psum_bank_bytes: int = 2_048             # one matmul writes inside one bank: 512 fp32 columns
    # -- tensor engine (PE array) ---------------------------------------------------------------
    pe_rows: int = 128                       # contraction (K) rows: stationary/moving partitions
    pe_cols: int = 128                       # stationary columns = output partitions (M)
    pe_partition_align: int = 32             # matmul operands start at a multiple of this partition
    tensor_min_moving: int = 64              # a matmul streams at least this many moving columns
    tensor_fixed_cycles: int = 16            # issue + pipeline fill per matmul
    tensor_fp32_passes: int = 4              # fp32 operands take this many passes through the array
    # -- vector and activation engines (one lane per partition) ----------------------------------
    vector_elems_per_cycle: int = 1          # per partition
    vector_fixed_cycles: int = 32
    act_elems_per_cycle: int = 1             # per partition
    act_fixed_cycles: int = 64
    # -- DMA and HBM --------------------------------------------------------------------------------
    dma_queues: int = 16
    dma_latency_cycles: int = 224            # ~160 ns at 1.4 GHz, first byte
    hbm_bytes_per_s: float = 2.9e12 / 8      # Trainium2: 2.9 TB/s per chip of 8 cores; this core's share
    hbm_capacity_bytes: int = 12 << 30       # Trainium2: 96 GiB per chip; this core's share
    # -- cores sharing the HBM, and the fabric between them ---------------------------------------
    cores: int = 1                           # cores on the device; hbm_* above are the device's totals
    link_bytes_per_s: float = 3.5e12 / 8     # Trainium2: 3.5 TB/s of DMA bandwidth per chip; a core's share
    link_latency_cycles: int = 448           # core-to-core: twice dma_latency_cycles (model choice)
    # -- synchronisation ------------------------------------------------------------------------
    semaphores: int = 32
    sync_cycles: int = 2                     # sem_wait (once satisfied), sem_signal, nop
    # -- clock --------------------------------------------------------------------------------------
    clock_hz: float = 1.4e9

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "name" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise NpuError(f"NPU config {self.name!r}: {f.name} must be a positive number, got {v!r}")
        if self.pe_rows > self.partitions or self.pe_cols > self.partitions:
            raise NpuError(f"NPU config {self.name!r}: the PE array ({self.pe_rows}x{self.pe_cols}) "
                           f"is larger than the {self.partitions} partitions")
        if self.psum_bytes_per_partition % self.psum_bank_bytes:
            raise NpuError(f"NPU config {self.name!r}: psum_bytes_per_partition is not a whole number of banks")

    # -- derived numbers (never stored twice) ----------------------------------------------------
    @property
    def sbuf_bytes(self) -> int:
        return self.partitions * self.sbuf_bytes_per_partition

    @property
    def psum_bytes(self) -> int:
        return self.partitions * self.psum_bytes_per_partition

    @property
    def moving_max(self) -> int:
        """Most moving columns (N) of one matmul: one PSUM bank of fp32."""
        return self.psum_bank_bytes // 4

    @property
    def hbm_bytes_per_cycle(self) -> float:
        """One core's HBM bandwidth: its share of the device's when every core streams."""
        return self.hbm_bytes_per_s / self.cores / self.clock_hz

    @property
    def core_hbm_bytes_per_s(self) -> float:
        return self.hbm_bytes_per_s / self.cores

    @property
    def link_bytes_per_cycle(self) -> float:
        return self.link_bytes_per_s / self.clock_hz

    @property
    def peak_flops(self) -> float:
        """Dense bf16 multiply-adds of the PE array, counted as 2 FLOPs each."""
        return 2.0 * self.pe_rows * self.pe_cols * self.clock_hz

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


_CORE = NpuConfig()

PRESETS: dict[str, NpuConfig] = {
    "core": _CORE,
    "chip": replace(_CORE, name="chip", cores=8, hbm_bytes_per_s=2.9e12, hbm_capacity_bytes=96 << 30),
    "edge": NpuConfig(
        name="edge", partitions=32, sbuf_bytes_per_partition=16_384, psum_bytes_per_partition=2_048,
        psum_bank_bytes=2_048, pe_rows=32, pe_cols=32, pe_partition_align=32, tensor_min_moving=16,
        tensor_fixed_cycles=8, tensor_fp32_passes=4, vector_elems_per_cycle=1, vector_fixed_cycles=16,
        act_elems_per_cycle=1, act_fixed_cycles=32, dma_queues=2, dma_latency_cycles=400,
        hbm_bytes_per_s=25.6e9, hbm_capacity_bytes=8 << 30, semaphores=16, sync_cycles=2, clock_hz=1.0e9,
        link_bytes_per_s=25.6e9, link_latency_cycles=800),   # one core: the link is never used
    # legacy (see the module docstring): one core given the whole chip's HBM
    "datacenter": replace(_CORE, name="datacenter", hbm_bytes_per_s=2.9e12, hbm_capacity_bytes=96 << 30),
}

DEFAULT = "core"


def load_config(spec: "str | Path | NpuConfig | None" = None) -> NpuConfig:
    """A preset name, a JSON file path, or a config (returned as is); None is the default preset (core)."""
    if spec is None:
        return PRESETS[DEFAULT]
    if isinstance(spec, NpuConfig):
        return spec
    if str(spec) in PRESETS:
        return PRESETS[str(spec)]
    path = Path(spec)
    if path.suffix != ".json":
        raise NpuError(f"unknown NPU config {str(spec)!r}: use a preset ({', '.join(PRESETS)}) or a .json file")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NpuError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NpuError(f"{path}: not a readable JSON NPU config ({e})") from None
    if not isinstance(data, dict):
        raise NpuError(f"{path}: an NPU config is a JSON object of field names to numbers")
    known = {f.name: f for f in fields(NpuConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise NpuError(f"{path}: unknown NPU config field(s) {', '.join(unknown)}")
    for k, v in data.items():
        if k != "name" and known[k].type == "int" and isinstance(v, float) and v.is_integer():
            data[k] = int(v)
        elif k != "name" and known[k].type == "int" and not isinstance(v, int):
            raise NpuError(f"{path}: NPU config field {k} must be an integer, got {v!r}")
    return replace(PRESETS[DEFAULT], **{"name": path.stem, **data})
