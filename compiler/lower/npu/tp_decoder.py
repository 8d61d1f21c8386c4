"""A Llama decoder tensor-parallel over a chip's cores: each core runs the ordinary chunk program
(chunk_program.build_chunk_program) on its own slice of the model, and two all-reduces a layer join them.

Split (Megatron-style, as tensor_parallel.py does for the MLP alone):
- attention by query heads: core c holds the rows of q for its heads, of k and v for their kv heads,
  and the columns of o for its heads (o split by *inputs*), so its o product is a partial sum of the
  whole [hidden] output; it keeps its kv heads' KV cache in its own HBM tensors;
- the MLP by hidden features: gate and up by outputs, down by inputs (a partial sum again); a core
  with more query heads takes fewer features (`ffn_slices`);
- the output head by vocabulary rows: each core writes its rows of the logits, no collective;
- the embedding, norms and rotary tables are shared HBM tensors every core reads; the residual stream
  is replicated (each core normalises it itself).
After o and after down, a one-hop all-reduce (tensor_parallel._all_reduce: each core sends its partial
to the n-1 others with a `dma_core` that counts its arrival on the receiver's semaphore) adds the
partials into every core's residual.

Heads that do not split evenly (SmolLM2-135M: 9 query heads, 3 kv heads, 8 cores) are split unevenly
but contiguously: the first H mod n cores take one query head more (SmolLM2: core 0 heads 0-1, cores
1-7 one head each), and a core computes the k/v of every kv head its query heads read. Three cores
(one kv group each) would read each k/v weight once but put 3 heads' q, k, v and o on each of 3 cores
(10 + 5 + 5 + 10 matmuls a layer on the critical path) while 5 cores idle through attention; the
uneven split's busiest core does 5 + 5 + 5 + 5, at the price of reading a kv head's k/v weights on
every core that needs them (SmolLM2: 8 k/v slices where 3 would do, +0.74 MB of the 9.0 MB a layer
reads). A core's heads must read its kv heads in equal groups (true for contiguous slices of a GQA
layout whenever no slice straddles a group unevenly; `shard_heads` checks).

Weights stay as the file stores them (`take`): a GGUF tensor's rows (outputs) and whole blocks of its
columns (inputs) are sliced raw, so int8 and q4 keep the file's own blocks on every core as they do on
one; o's and down's columns split along the inputs at whole blocks of 32 (SmolLM2's Q4_1: a 64-wide head
is 2 blocks, 192 hidden features 6), and where a split cuts a block (a K-quant's 256) that weight is
requantized along its slice (`TpChip.requantized` names them).

`TpChip` holds the per-core images and their chip programs; tp_runtime.py makes them a target
(`lower_npu(..., config="chip")`: the decoder runtime on the chip simulator); `tp_decode_figures` times
a decode step against one core and the chip's HBM bound.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np

from isthmus.compiler.lower.npu.chunk_program import DecoderImage, build_chunk_program, build_image
from isthmus.compiler.lower.npu.quant_weights import BLOCKED
from isthmus.compiler.lower.npu.resident_kernels import gate_up_rows, linear, new_act
from isthmus.compiler.lower.npu.tensor_parallel import RECV_SEMS, _all_reduce, _slices
from isthmus.compiler.lower.npu.weights import dense_f32
from isthmus.npu.config import load_config

SHARED = ("embed", "norms", "rope", "rot")       # resident tensors every core reads (the same bytes)


def shard_heads(H: int, G: int, n: int) -> list[tuple[list[int], list[int]]]:
    """(query heads, kv heads) of each of n cores: contiguous query-head slices, the first H mod n cores
    one head more. ValueError where a core's heads would not read its kv heads in equal groups."""
    if H < n:
        raise ValueError(f"{H} query heads cannot give each of {n} cores one")
    group = H // G
    out, h0 = [], 0
    for c in range(n):
        hs = list(range(h0, h0 + H // n + (c < H % n)))
        h0 = hs[-1] + 1
        gs = sorted({h // group for h in hs})
        per = len(hs) // len(gs)
        if len(hs) % len(gs) or any(h // group != gs[i // per] for i, h in enumerate(hs)):
            raise ValueError(f"core {c}'s query heads {hs} do not read kv heads {gs} in equal groups")
        out.append((hs, gs))
    return out


def ffn_slices(F: int, heads: list[int], hd: int, grain: int = 32, stacked: int | None = None) -> list[range]:
    """Contiguous hidden-feature slices of the MLP, one per core, balancing what the uneven head split
    unbalances. A core with e query heads more than the fewest reads e*hd more rows of q, of o's
    columns and (its kv head's copy at a second partition start: chunk_program.assign_slots) of k: as
    many weight bytes as e*hd hidden features of gate, up and down. So it takes e*hd features fewer
    (in whole `grain`s, GGUF's 32-wide blocks, so quantized slices keep the file's blocks), and the
    others share them out, earliest cores first. SmolLM2 (1,536 features, 9 heads of 64 over 8 cores):
    core 0 (two heads) 128 features, cores 1-2 224, cores 3-7 192; core 0's gate/up/down then take one
    chunk of 128 (15 matmuls a layer) where 192 take two (30), which pays for its second head's
    attention, and its weight stream is 36 MB a step instead of 42 (the other cores' 36 and 39).

    `stacked` (the partitions, where gate and up are stacked in one weight: chunk_program.build_image): the
    even split where it leaves the busiest core fewer output chunks of gate and up (a decode matmul costs
    the same whatever its fill): SmolLM2's 192 features a core stack into 3 chunks (15 matmuls), where
    the uneven split's 224 take 4 (20) on cores 1-2, which set the MLP's pace. Core 0 then streams 42.5 MB
    a step against the others' 35.8, which its attention's longer phase leaves room for."""
    n = len(heads)
    base = _slices(F, n)
    if F % (n * grain) or len(set(heads)) == 1:
        return base
    if stacked and max(map(len, base)) <= F // n and gate_up_rows(F // n, stacked) is not None \
            and gate_up_rows(F // n + grain, stacked) is None:
        return base
    per = F // n
    fewest = min(heads)
    size = [max(grain, per - round((h - fewest) * hd / grain) * grain) for h in heads]
    spare = F - sum(size)
    rest = [c for c in range(n) if heads[c] == fewest]
    for j in range(spare // grain):
        size[rest[j % len(rest)]] += grain
    out, f0 = [], 0
    for k in size:
        out.append(range(f0, f0 + k))
        f0 += k
    return out


def _node(node, data):
    """A stand-in for a linear node whose weight is `data` (what build_image reads of a node)."""
    return SimpleNamespace(op=node.op, inputs=[node.inputs[0], SimpleNamespace(data=data)], outputs=node.outputs,
                           attrs=node.attrs)


def _rows(hs, hd):
    return np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in hs])


def take(data, rows=None, cols: range | None = None):
    """Rows (outputs) and a contiguous range of columns (inputs) of a weight as stored. A GGUF
    QuantizedArray stays one, its raw blocks sliced (so a quantized format keeps the file's own blocks,
    exactly as one core does) when the columns keep its blocks whole (Q8_0/Q4_0/Q4_1: 32 inputs, K-quants:
    256); otherwise the slice of its dequantized values (a quantized format then requantizes it in blocks
    of 32 along the slice: `requantized` says so)."""
    from isthmus.compiler.quant import QuantizedArray, _layout
    if isinstance(data, QuantizedArray) and len(data.shape) == 2:
        bs, ts = _layout(data.qtype).block_size, _layout(data.qtype).type_size
        n, k = data.shape
        c0, c1 = (0, k) if cols is None else (cols.start, cols.stop)
        if c0 % bs == 0 and c1 % bs == 0:
            raw = data.raw.reshape(n, k // bs, ts)
            raw = raw if rows is None else raw[np.asarray(rows)]
            raw = np.ascontiguousarray(raw[:, c0 // bs:c1 // bs]).reshape(raw.shape[0], -1)
            return QuantizedArray(data.qtype, (raw.shape[0], c1 - c0), raw)
    w = dense_f32(data)
    w = w if rows is None else w[np.asarray(rows)]
    w = w if cols is None else w[:, cols.start:cols.stop]
    return np.ascontiguousarray(w)


def requantized(data) -> bool:
    """A slice `take` could not keep in the file's blocks (a quantized weight as dense values)."""
    return not hasattr(data, "qtype")


def core_specs(spec, n: int, stacked: int | None = None) -> tuple[list, list[range]]:
    """Each core's LlamaSpec (its heads, hidden features and vocabulary rows; the vocabulary of the
    embedding stays whole) and each core's vocabulary rows. Weights stay as stored (`take`)."""
    hd = spec.head_dim
    heads = shard_heads(spec.heads, spec.kv_heads, n)
    nh = [len(hs) for hs, _ in heads]
    fsl = ffn_slices(spec.ffn, nh, hd, stacked=stacked)
    # the head's rows evenly: its matmuls end every core's step. (A core with more query heads gave one
    # chunk of rows to each of the others while the timing model charged its weight loads for the link
    # sends beside them, which made its stream the pace of the first layers: SmolLM2 215,044 -> 210,359
    # cycles then; since transfers share only their own resource, the even rows measure 199,120 -> 198,717.)
    vsl = _slices(spec.vocab, n)
    out = []
    for c, (hs, gs) in enumerate(heads):
        qr, kr, fr = _rows(hs, hd), _rows(gs, hd), fsl[c]
        oc = range(hs[0] * hd, (hs[-1] + 1) * hd)              # contiguous heads: o's columns a range
        layers = []
        for L in spec.layers:
            w = {k: getattr(L, k).inputs[1].data for k in ("q", "k", "v", "o", "gate", "up", "down")}
            layers.append(replace(L, q=_node(L.q, take(w["q"], qr)), k=_node(L.k, take(w["k"], kr)),
                                  v=_node(L.v, take(w["v"], kr)), o=_node(L.o, take(w["o"], cols=oc)),
                                  gate=_node(L.gate, take(w["gate"], fr)), up=_node(L.up, take(w["up"], fr)),
                                  down=_node(L.down, take(w["down"], cols=fr))))
        head = take(spec.head.inputs[1].data, vsl[c])
        out.append(replace(spec, heads=len(hs), kv_heads=len(gs), ffn=len(fr), layers=layers,
                           head=_node(spec.head, head)))
    return out, vsl


@dataclass
class Shard:
    """Core `core`'s part of a tensor-parallel chunk program (what build_chunk_program's `tp` asks)."""

    core: int
    images: list[DecoderImage]
    vocab0: int

    @property
    def cores(self) -> int:
        return len(self.images)

    def declare(self, em) -> dict:
        """Every core's resident tensors, in the same order in every core's program (the cores share HBM:
        a name sits at one offset): the shared ones once, then core k's as "c{k}.<name>". Returns this
        core's, under their own names. Also divides the DMA queues: the last n-1 for the all-reduces'
        sends (`link_queues`), two for the KV window, the norms and the logits, the rest for the weight
        stream (`weight_queues`). A core's weights are 1/8 of the model, so its ring runs the stream
        many layers ahead; on a shared in-order queue a send or a layer's KV window load waited behind
        those prefetches (sends on the weights' queues: 3.5k cycles an all-reduce, a step 512k cycles;
        the KV loads too: layer 1 took 75k cycles, the step 345k)."""
        Q, n = em.cfg.dma_queues, self.cores
        if Q < n + 1:
            raise ValueError(f"{Q} DMA queues: too few to keep {n - 1} for the all-reduce and 2 for the rest")
        self.link_queues = list(range(Q - (n - 1), Q))
        self.weight_queues = list(range(Q - (n - 1) - 2))
        em.dma_queues = [Q - n - 1, Q - n]
        own = {}
        for name, dtype, shape, _ in self.images[0].resident:
            if name in SHARED:
                own[name] = em.tensor(name, shape, dtype, "input")
        for k, img in enumerate(self.images):
            for name, dtype, shape, _ in img.resident:
                if name not in SHARED:
                    t = em.tensor(f"c{k}.{name}", shape, dtype, "input")
                    if k == self.core:
                        own[name] = t
        return own

    def slots(self, em, D: int, rows: int):
        """Two sets of receive slots (alternating by the parity of the all-reduce: tensor_parallel), each the
        n-1 peers' partials and this core's residual plus its own. A peer's `dma_core` names them by its own
        offsets, so every core allocates them first (TpChip.program checks that the offsets agree)."""
        nc = -(-D // em.cfg.partitions)
        tiles = [em.sbuf((self.cores, nc, rows), "f32", what="all-reduce receive") for _ in RECV_SEMS]
        self.slot_offsets = [t.offset for t in tiles]
        return tiles

    def reduce_linear(self, em, act, w, stream, x, slots, k: int, scale=None, k_outer: bool = False) -> None:
        """x += the sum over the cores of W_c act_c (times `scale`, a deferred 1/rms: resident_kernels.RowScale):
        this core's partial product, then the k-th all-reduce."""
        part = new_act(em, x.features, x.rows, "f32", "partial sum")
        linear(em, act, w, stream, part, scale=scale, k_outer=k_outer)
        with em.label("all_reduce"):
            _all_reduce(em, self.core, self.cores, part, x, slots[k % 2], RECV_SEMS[k % 2], k // 2 + 1,
                        self.link_queues)
        em.free(part.tile)


class TpChip:
    """A decoder's per-core images on a chip config (default `chip`: 8 cores) and its chip programs.
    `weights`: how the weights sit in HBM (quant_weights.OPTIONS, as for one core); `requantized` lists
    the quantized weights whose slices could not keep the file's blocks (`take`)."""

    def __init__(self, spec, config="chip", precision: str = "bf16x3", context: int = 256, cores: int | None = None,
                 weights: str = "bf16"):
        self.cfg = load_config(config)
        n = cores or self.cfg.cores
        specs, self.vocab = core_specs(spec, n, stacked=self.cfg.partitions)
        self.spec = spec
        self.weights = weights
        self.images = [build_image(s, self.cfg, precision, context, weights, stack_gate_up=True) for s in specs]
        self.requantized = sorted({w.name for img in self.images for w in [*(w for lw in img.weights
                                   for w in lw.values()), img.head] if w.fmt in BLOCKED
                                   and hasattr(_source(spec, w.name), "qtype")
                                   and requantized(_source(img.spec, w.name))})
        for img in self.images[1:]:                      # the shared tensors' bytes are core 0's
            for name in SHARED:
                a = next(r for r in self.images[0].resident if r[0] == name)
                b = next(r for r in img.resident if r[0] == name)
                if (a[1], a[2]) != (b[1], b[2]):
                    raise ValueError(f"shared tensor {name} differs between cores")
            img.resident = [(r[0], r[1], r[2], None) if r[0] in SHARED else r for r in img.resident]
        self.cmax = self.images[0].cmax
        self.programs: dict[tuple[int, int], object] = {}

    def program(self, P: int, C: int):
        from isthmus.npu.chip import ChipProgram
        prog = self.programs.get((P, C))
        if prog is None:
            shards = [Shard(c, self.images, self.vocab[c].start) for c in range(len(self.images))]
            prog = ChipProgram([build_chunk_program(img, P, C, tp=sh) for img, sh in zip(self.images, shards)])
            if len({tuple(sh.slot_offsets) for sh in shards}) > 1:    # a peer's dma_core writes at its own offsets
                raise ValueError(f"the all-reduce receive slots differ between cores: "
                                 f"{[sh.slot_offsets for sh in shards]}")
            self.programs[P, C] = prog
        return prog

    def resident_names(self) -> list[str]:
        """Every resident tensor under its chip name (the shared ones once, core k's as "c{k}.<name>")."""
        return [name if name in SHARED else f"c{k}.{name}" for k, img in enumerate(self.images)
                for name, *_ in img.resident if not (name in SHARED and k)]

    def resident_values(self, skip=()) -> dict:
        """Host arrays of every resident tensor under its chip name (KV caches zero)."""
        from isthmus.npu.isa import DTYPES
        out = {}
        for k, img in enumerate(self.images):
            for name, dtype, shape, data in img.resident:
                if (name in SHARED and k) or name in skip:
                    continue
                arr = data if data is not None else np.zeros(shape, DTYPES[dtype].np)
                out[name if name in SHARED else f"c{k}.{name}"] = arr
        return out

    @property
    def weight_bytes(self) -> int:
        """Weight bytes the cores stream per token, together (k/v slices a core shares count per core)."""
        return sum(img.weight_bytes for img in self.images)


def _source(spec, name: str):
    """The stored weight a packed weight's name ("L3.o", "head") was made from."""
    if name == "head":
        return spec.head.inputs[1].data
    layer, what = name.split(".")
    return getattr(spec.layers[int(layer[1:])], "gate" if what == "gu" else what).inputs[1].data


def tp_decode_figures(spec, window: int = 64, precision: str = "bf16", context: int = 256,
                      chip: TpChip | None = None, weights: str = "bf16") -> dict:
    """One decode step (P = 1 over a window of `window`) on `chip` (tensor-parallel) and on one `core`
    (the ordinary chunk program; timing model only): cycles, the speed-up, the chip's HBM bound (the
    one-core step's compulsory HBM bytes, weights read once, at the whole chip's bandwidth; the
    all-reduces go over the core-to-core link, not HBM, and are in the chip's cycles, not in the bound)."""
    from isthmus.npu.chip import schedule_chip
    from isthmus.npu.timing import roofline, schedule
    tc = chip or TpChip(spec, "chip", precision, context, weights=weights)
    core_cfg = load_config("core")
    ctl = schedule_chip(tc.program(1, window), tc.cfg)
    one = build_chunk_program(build_image(spec, core_cfg, precision, context, tc.weights), 1, window)
    single = schedule(one, core_cfg).cycles
    rl = roofline(one, core_cfg)
    hbm = rl.hbm_bytes / (tc.cfg.hbm_bytes_per_s / tc.cfg.clock_hz)
    per_core = [t.cycles for t in ctl.timelines]
    return {"cycles": ctl.cycles, "one_core_cycles": single, "speedup": single / ctl.cycles,
            "hbm_bytes": rl.hbm_bytes, "hbm_bound_cycles": hbm, "hbm_ratio": ctl.cycles / hbm,
            "one_core_roofline": rl, "core_cycles": per_core, "weight_bytes": tc.weight_bytes,
            "timeline": ctl, "chip": tc}
