"""A Llama decoder as NPU programs: one *chunk program* per (new tokens P, KV window C) bucket.

A chunk program runs the whole model over P new tokens with every activation resident in SBUF
(feature-major, resident_kernels), weights streamed through an SBUF ring (weights), and the KV
cache in HBM. Nothing in it depends on how long the conversation is: the caller passes the token
ids, their positions and a validity row for the window, so one program serves every decode step
of a bucket, loaded once (`LoadedProgram`) and re-run.

KV cache. HBM holds, per layer, K^T [kv_heads, head_dim, Cmax] and V [Cmax, kv_heads*head_dim],
right-aligned: the newest entry is at Cmax-1. A program with window C reads the last C entries
and shifts by P: SBUF window slots [0, P) take this step's keys/values, slots [P, C) the cache's
last C-P entries; after the layer it writes the window back in time order, oldest first. The
runtime's validity row (0 for a live slot, -30000 for an empty or left-padding one) masks the
rest, and a static affine `select` masks future tokens among the new ones. Programs of every
bucket share one HBM image (`LoadedProgram(hbm=...)`), so growing the window needs no copy.

Positions are data too: the rotary tables are gathered by position (`dma_gather`), and token
embeddings by id, so prefill (P up to the config's `moving_max`, 512, padded on the left to a
bucket) and decode (P = 1) are the same generator.

Head slots. The PE array needs a head's q^T and its kv head's k^T at the same partition start
(a multiple of 32). Heads are assigned to (chunk, start) slots start-major, grouped by kv head;
k^T gets one copy of a kv head at every start its query heads use (for SmolLM2: 2 chunks, as
many as the plain layout). The permutation is folded into the packed weights of q, k and o.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from isthmus.compiler.lower.npu.attention import (Unit, attend, head_perm, rope, rope_pair, rope_table,
                                                  rotation_matrix)
from isthmus.compiler.lower.npu.block_linear import shared_input
from isthmus.compiler.lower.npu.emitter import Emitter, Tile
from isthmus.compiler.lower.npu.llama_matcher import LlamaSpec
from isthmus.compiler.lower.npu.quant_weights import BLOCKED
from isthmus.compiler.lower.npu.resident_kernels import (Act, Consts, GateUp, RowScale, _sub, gate_up_rows, linear,
                                                         linear_rows, new_act, rmsnorm, split_into)
from isthmus.compiler.lower.npu.weights import PackedWeight, WeightStream, dense_f32, make_weight, piece_cols_for
from isthmus.errors import NpuError
from isthmus.npu.config import NpuConfig
from isthmus.npu.isa import DTYPES, Program


@dataclass
class Slots:
    stride: int                       # partitions per slot (head_dim rounded up to the PE alignment)
    per_chunk: int
    q_chunks: int
    head_slot: list[tuple[int, int]]  # query head -> (chunk, start)
    k_chunks: int
    k_groups: list[list[int | None]]  # [k chunk][slot index] -> kv head held there
    q_rows: int                       # rows of the permuted q / attn^T (trailing unused slots trimmed)
    hc: int = 1                       # chunks a head spans (> 1: a head wider than the partitions)

    def k_pieces(self, hd: int) -> list[tuple[int, int, int, int, int, bool]]:
        """(kv head g, first row of its K^T, rows, k chunk, partition start, first copy) for every place
        k^T holds (part of) a kv head; a head wider than the partitions is `hc` pieces of a chunk each."""
        if self.hc > 1:
            G = len(self.k_groups) // self.hc
            return [(g, j * self.stride, self.stride, j * G + g, 0, True) for j in range(self.hc) for g in range(G)]
        out, seen = [], set()
        for j, row in enumerate(self.k_groups):
            for i, g in enumerate(row):
                if g is not None:
                    out.append((g, 0, hd, j, i * self.stride, g not in seen))
                    seen.add(g)
        return out


def assign_slots(H: int, G: int, hd: int, parts: int, align: int) -> Slots | None:
    """Slots for H query heads and G kv heads of width hd. A head wider than the partitions (a whole
    multiple of them) spans hc = hd/parts chunks: sub-head j of query head h in chunk j*H + h, of kv
    head g in k chunk j*G + g (the heads of a group stay in consecutive chunks for every j)."""
    if hd > parts:
        if hd % parts:
            return None
        hc = hd // parts
        return Slots(parts, 1, H * hc, [(h, 0) for h in range(H)], G * hc,
                     [[g] for _ in range(hc) for g in range(G)], H * hd, hc)
    stride = -(-hd // align) * align
    if stride > parts or parts % stride:
        return None
    per = parts // stride
    nqc = -(-H // per)
    order = [(c, i) for i in range(per) for c in range(nqc)][:H]
    head_slot = [(c, i * stride) for c, i in order]
    group = H // G
    need: dict[int, list[int]] = {}
    for h, (c, s) in enumerate(head_slot):
        lst = need.setdefault(s // stride, [])
        if h // group not in lst:
            lst.append(h // group)
    nkc = max(len(v) for v in need.values())
    k_groups = [[need.get(i, [])[j] if j < len(need.get(i, [])) else None for i in range(per)] for j in range(nkc)]
    q_rows = max(c * parts + s + hd for c, s in head_slot)
    return Slots(stride, per, nqc, head_slot, nkc, k_groups, q_rows)


@dataclass
class DecoderImage:
    """Everything host-side a chunk program needs: packed weights, tables, the resident HBM layout."""

    spec: LlamaSpec
    cfg: NpuConfig
    precision: str                            # "bf16x3" | "bf16" | "f32" (see npu.py)
    slots: Slots
    cmax: int
    max_pos: int
    weights: list[dict] = field(default_factory=list)     # per layer: name -> PackedWeight
    head: PackedWeight | None = None
    resident: list[tuple[str, str, tuple, np.ndarray | None]] = field(default_factory=list)
    ring_piece_bytes: int = 0
    released: bool = False
    k_rows: int = 0                           # rows of k^T (a kv head's copies included)
    kv: bool = False                          # k and v stacked in one weight "kv" (build_image)
    weight_option: str = "bf16"               # quant_weights.OPTIONS: each weight's format follows from it
    scale_chunks: int = 0                     # columns of the per-output scale table (int8/fp8 weights)

    @property
    def wdt(self) -> str:
        """Dtype of the weights' matmul operands (and of the activations feeding them)."""
        return "f32" if self.precision == "f32" else "bf16"

    @property
    def adt(self) -> str:
        """Dtype of the other matmul operands: attention, rotary, norms; and of the KV cache."""
        return "bf16" if self.precision == "bf16" else "f32"

    @property
    def split(self) -> bool:
        return self.precision == "bf16x3"

    def release_host_copies(self) -> None:
        """Drop the packed host arrays once they are bound into HBM (the HBM image holds them)."""
        self.resident = [(n, d, s, None) for n, d, s, _ in self.resident]
        for w in [w for lw in self.weights for w in lw.values()] + [self.head]:
            w.data = w.qdata = w.bscale = w.bzero = None
            if w.lo is not None:
                w.lo.data = None
        self.released = True

    @property
    def formats(self) -> dict[str, int]:
        """How many weights are stored in each format."""
        out: dict[str, int] = {}
        for w in [w for lw in self.weights for w in lw.values()] + [self.head]:
            out[w.fmt] = out.get(w.fmt, 0) + 1
        return out

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights the program streams from HBM per token (all linears, the head included)."""
        ws = [w for layer in self.weights for w in layer.values()] + [self.head]
        return sum(w.nbytes + (w.lo.nbytes if w.lo is not None else 0) for w in ws)


def build_image(spec: LlamaSpec, cfg: NpuConfig, precision: str, context: int,
                weights: str = "bf16", stack_gate_up: bool = False) -> DecoderImage:
    """The decoder's packed weights and resident tensors for `cfg`. `stack_gate_up` (the chip's cores):
    gate and up as one weight "gu" where that takes fewer output chunks (resident_kernels.gate_up_rows)."""
    from isthmus.compiler.lower.npu.quant_weights import choose_format
    from isthmus.kernels.numba.weight_pack import dequantize
    P = cfg.partitions
    sl = assign_slots(spec.heads, spec.kv_heads, spec.head_dim, P, cfg.pe_partition_align)
    if sl is None:
        raise ValueError("head_dim does not fit the partition layout")
    hd, G, D = spec.head_dim, spec.kv_heads, spec.hidden
    cmax = max(64, 1 << (max(context, 1) - 1).bit_length())
    img = DecoderImage(spec, cfg, precision, sl, cmax, cmax, weight_option=weights)
    wdt, split = img.wdt, img.split
    if weights != "bf16" and precision == "f32":
        raise ValueError(f"quantized NPU weights ({weights}) need precision bf16 or bf16x3, not f32")
    # one piece (hi or lo) in the ring: 1/8 of SBUF, or up to 1/4 where that is needed for a piece's DMA to
    # move 16x the bytes the DMA latency costs (edge: 16 x 400 cycles x 25.6 B = 160 KB over 32 partitions;
    # a piece of 1/8, 64 KB, spent 1.29x the step's HBM bound, 1/4 1.12x; core's 1/8 is 53x already)
    want = 16 * cfg.dma_latency_cycles * cfg.hbm_bytes_per_cycle / P
    budget = int(min(cfg.sbuf_bytes_per_partition // 4, max(cfg.sbuf_bytes_per_partition // 8, want)))
    budget //= 2 if split else 1
    img.ring_piece_bytes = budget * (2 if split else 1)

    perm = head_perm(hd, P, spec.rope_layout)        # q and k dims in this order (o reads V's own)
    q_map = np.full(sl.q_rows, -1)
    o_map = np.full(sl.q_rows, -1)
    for h, (c, s) in enumerate(sl.head_slot):
        for j in range(sl.hc):                         # sub-head j of a wide head: chunk j*H + h
            r0 = (c + j * spec.heads) * P + s
            n = min(hd, P)
            q_map[r0:r0 + n] = h * hd + perm[j * n:(j + 1) * n]
            o_map[r0:r0 + n] = np.arange(h * hd + j * n, h * hd + (j + 1) * n)
    k_map = np.full(sl.k_chunks * P, -1)
    for g, row0, n, j, st, _ in sl.k_pieces(hd):
        k_map[j * P + st:j * P + st + n] = g * hd + perm[row0:row0 + n]
    k_map = k_map[:int(np.max(np.nonzero(k_map >= 0)[0])) + 1]

    def pack(name, node, rows=None, cols=None, row_major=False, option=weights, most=None):
        data = node.inputs[1].data
        n = len(rows) if rows is not None else data.shape[0]
        k = len(cols) if cols is not None else data.shape[1]
        fmt = choose_format(data, n, option)
        if row_major:          # V: the weight is the moving operand, its outputs along the free dim, where
            fmt = "bf16"       # neither a per-output scale nor per-block partial sums can be applied
        pcols = piece_cols_for(k, n, P, wdt, budget, fmt)
        w = make_weight(name, data, wdt, P, min(pcols, most or pcols), rows=rows, cols=cols,
                        split=split, label=node.outputs[0].name, fmt=fmt)
        if w.chan_scale is not None:
            w.scale_chunk0 = img.scale_chunks
            img.scale_chunks += -(-n // P)
        return w

    gu_rows = gate_up_rows(spec.ffn, P) if stack_gate_up else None
    img.k_rows = len(k_map)
    # (the chip's cores, dense weights, one kv head of at most half the partitions) k and v stacked in one
    # weight "kv": k's rows once (partitions [0, hd)), v's after them ([hd, 2 hd)); one chunk, 5 decode
    # matmuls where k and v took 10; the chunk program puts k's other copies and v's row in place
    firsts = [p for p in sl.k_pieces(hd) if p[5]]
    kv_rows = None
    if stack_gate_up and weights == "bf16" and sl.hc == 1 and sl.stride == hd and G == 1 and 2 * hd <= P \
            and sl.k_chunks == 1 and [(p[3], p[4]) for p in firsts] == [(0, 0)]:
        kv_rows = np.concatenate([k_map[:hd], G * hd + np.arange(hd)])
    img.kv = kv_rows is not None
    for L in spec.layers:
        i = L.index
        lw = {"q": pack(f"L{i}.q", L.q, rows=q_map)}
        if kv_rows is None:
            lw.update(k=pack(f"L{i}.k", L.k, rows=k_map), v=pack(f"L{i}.v", L.v, row_major=True))
        else:
            lw["kv"] = pack(f"L{i}.kv", SimpleNamespace(inputs=[None, SimpleNamespace(
                data=_stack(L.k.inputs[1].data, L.v.inputs[1].data))], outputs=L.k.outputs), rows=kv_rows)
        lw["o"] = pack(f"L{i}.o", L.o, cols=o_map)
        if gu_rows is None:
            lw.update(gate=pack(f"L{i}.gate", L.gate), up=pack(f"L{i}.up", L.up))
        else:
            lw["gu"] = pack(f"L{i}.gu", SimpleNamespace(inputs=[None, SimpleNamespace(
                data=_stack(L.gate.inputs[1].data, L.up.inputs[1].data))], outputs=L.gate.outputs), rows=gu_rows)
        lw["down"] = pack(f"L{i}.down", L.down)
        img.weights.append(lw)
    # the output head is the layer 4 bits hurt most (SmolLM2's Q8_0 head requantized to q4: logits 17.5 %
    # off); under q4 it takes int8, as llama.cpp's Q4 presets keep output.weight at Q6_K or Q8_0
    # (the chip's cores) the head in pieces of HEAD_COLS outputs: it streams last, and its matmuls wait for
    # whole pieces, so the step ends one small piece's matmuls after the stream instead of a big one's
    img.head = pack("head", spec.head, option="int8" if weights == "q4" else weights,
                    most=HEAD_COLS if stack_gate_up else None)

    nc = -(-D // P)
    norms = np.zeros((2 * len(spec.layers) + 1, P, nc), np.float32)

    def lay(vec):
        v = np.zeros(nc * P, np.float32)
        v[:D] = vec
        return v.reshape(nc, P).T

    for L in spec.layers:
        norms[2 * L.index] = lay(dense_f32(L.attn_norm.inputs[1].data))
        norms[2 * L.index + 1] = lay(dense_f32(L.ffn_norm.inputs[1].data))
    norms[-1] = lay(dense_f32(spec.final_norm.inputs[1].data))
    Lc = len(spec.layers)
    res = img.resident
    res.append(("embed", "f32", (spec.vocab, D), dequantize(spec.embed.inputs[0].data)))
    scales = np.zeros((P, max(img.scale_chunks, 1)), np.float32)
    for w in [w for lw in img.weights for w in lw.values()] + [img.head]:
        for suffix, dt, arr in w.parts_in_hbm:
            res.append((w.name + suffix, dt, arr.shape, arr))
        if w.lo is not None:
            res.append((w.lo.name, wdt, w.lo.data.shape, w.lo.data))
        if w.chan_scale is not None:
            nch = -(-w.n // P)
            col = np.zeros(nch * P, np.float32)
            col[:w.n] = w.chan_scale
            scales[:, w.scale_chunk0:w.scale_chunk0 + nch] = col.reshape(nch, P).T
    if img.scale_chunks:
        res.append(("wscales", "f32", scales.shape, scales))
    res.append(("norms", "f32", norms.shape, norms))
    res.append(("rope", "f32", (img.max_pos, 2 * sl.hc * P),
                rope_table(img.max_pos, P, sl.stride, hd, spec.rope_theta, spec.rope_layout).reshape(img.max_pos, -1)))
    res.append(("rot", img.adt, (P, P), rotation_matrix(P, sl.stride, hd, spec.rope_layout)))
    res.append(("kcache", img.adt, (Lc, G, hd, cmax), None))
    res.append(("vcache", img.adt, (Lc, cmax, G * hd), None))
    return img


HEAD_COLS = 512


def _stack(a, b):
    """Two weights as stored, rows of `a` then rows of `b` (a GGUF tensor's raw blocks stay as they are)."""
    from isthmus.compiler.quant import QuantizedArray
    if isinstance(a, QuantizedArray) and isinstance(b, QuantizedArray) and a.qtype == b.qtype:
        return QuantizedArray(a.qtype, (a.shape[0] + b.shape[0], a.shape[1]), np.concatenate([a.raw, b.raw]))
    return np.concatenate([dense_f32(a), dense_f32(b)])


def resident_values(img: DecoderImage, skip=()) -> dict:
    """Host arrays to bind (the caches start at zero: empty slots must not be NaN)."""
    if img.released:
        raise RuntimeError("the decoder image's host arrays were released after binding")
    out = {}
    for name, dtype, shape, data in img.resident:
        if name not in skip:
            out[name] = data if data is not None else np.zeros(shape, DTYPES[dtype].np)
    return out


def _declare(em: Emitter, img: DecoderImage, tensors: dict | None = None) -> dict:
    """Declare the image's resident tensors (or take them from `tensors`, name -> HBM tensor: a core of a
    tensor-parallel chip, whose program declares every core's tensors) and bind the weights to them."""
    t = dict(tensors) if tensors is not None else {}
    for name, dtype, shape, _ in img.resident:
        if tensors is None:
            t[name] = em.tensor(name, shape, dtype, "input")
    for w in [w for lw in img.weights for w in lw.values()] + [img.head]:
        if w.fmt == "bf16":
            w.hbm = t[w.name]
        else:
            w.qhbm = t[w.name + ".q"]
            w.shbm, w.zhbm = t.get(w.name + ".s"), t.get(w.name + ".z")
        if w.lo is not None:
            w.lo.hbm = t[w.lo.name]
    return t


def resident_end(img: DecoderImage) -> int:
    """Bytes of HBM the resident tensors take (every chunk program declares them first, identically)."""
    em = Emitter(img.cfg)
    _declare(em, img)
    return em._hbm_top


def io_bytes(img: DecoderImage, P: int, C: int) -> int:
    return 4 * (2 * P + C + img.spec.vocab) + 4 * 64


def build_chunk_program(img: DecoderImage, P: int, C: int, batched: bool = False,
                        cache_len: int | None = None, tp=None) -> Program:
    """The program for P new tokens over a window of C (P <= C <= Cmax, powers of two).

    `batched`: the P tokens are one decode step of P *different* sequences (batched decode). The
    linears, norms and rotary run on the P columns at once (the PE array's moving side is the batch:
    up to 64 columns cost what one does); each sequence b has its own KV cache (`bkcache`/`bvcache`
    slot b, right-aligned like the one-sequence cache), its own window of C in SBUF, its own validity
    row `kvbias[b]`, and attends alone; the logits of every sequence come back ([P, vocab]). A batch's
    cache slots hold `cache_len` entries (default: the image's capacity; a step-by-step batch passes C:
    the window's entries, copied in and out by the host).

    `tp`: one core's part of a tensor-parallel chip program (tp_decoder.Shard): `img` holds this core's
    heads, hidden features and logit rows; the o and down projections give partial sums that an
    all-reduce between the cores adds into the (replicated) residual stream; the core writes its rows
    of the logits."""
    try:
        return _chunk_program(img, P, C, batched, cache_len, tp, share=True)
    except NpuError as e:
        if "SBUF is full" not in str(e) or img.weights[0]["q"].fmt not in BLOCKED:
            raise
    # q and k sharing their input per block (block_linear.shared_input) hold it over k's linear, which
    # can leave SBUF too fragmented for a later linear (edge, int8, 8 tokens): then build without
    return _chunk_program(img, P, C, batched, cache_len, tp, share=False)


def _chunk_program(img: DecoderImage, P: int, C: int, batched: bool, cache_len: int | None, tp,
                   share: bool) -> Program:
    spec, cfg, sl = img.spec, img.cfg, img.slots
    wdt, adt, split = img.wdt, img.adt, img.split
    NP = cfg.partitions
    D, F, hd, G, V = spec.hidden, spec.ffn, spec.head_dim, spec.kv_heads, spec.vocab
    Lc, cmax = len(spec.layers), (cache_len or img.cmax) if batched else img.cmax
    nc = -(-D // NP)
    Vh, v0 = img.head.n, (tp.vocab0 if tp is not None else 0)    # logit rows this program computes
    em = Emitter(cfg)
    hbm = _declare(em, img, tp.declare(em) if tp is not None else None)
    if batched:                                  # first: at the same offsets in every window's program
        bkc = em.tensor("bkcache", (P, Lc, G, hd, cmax), adt, "input")       # resident, as "kcache"
        bvc = em.tensor("bvcache", (P, Lc, cmax, G * hd), adt, "input")
    ids_t = em.tensor("ids", (P,), "i32", "input")
    pos_t = em.tensor("pos", (P,), "i32", "input")
    bias_t = em.tensor("kvbias", (P, C) if batched else (C,), "f32", "input")
    logits_t = em.tensor("logits", (P, V) if batched else (V,), "f32", "output")
    S = P if batched else 1                      # sequences: windows, caches, validity rows
    Pw = 1 if batched else P                     # new tokens of each sequence in its window
    nb = -(-P // NP)
    nvch = -(-C // NP)
    consts = Consts(em)

    # -- resident SBUF ------------------------------------------------------------------------------
    # first: the all-reduce's receive slots, which peers write at this core's offsets of their own
    # (the same on every core only ahead of the tiles whose sizes differ between cores)
    reduce_slots = tp.slots(em, D, P) if tp is not None else None
    x = new_act(em, D, P, "f32", "residual stream")
    h = new_act(em, D, P, wdt, "normed", split)
    # (tensor-parallel decode, q and k of as many chunks, each of the same rows) q and k side by side, column
    # 0 and 1 of one tile, so one rotary matmul a chunk turns both (`rope_pair`)
    kn = img.k_rows
    paired = (tp is not None and P == 1 and not batched and sl.hc == 1 and -(-kn // NP) == -(-sl.q_rows // NP)
              and all(min(NP, sl.q_rows - c * NP) == min(NP, kn - c * NP) for c in range(-(-kn // NP))))
    if paired:
        qk = em.sbuf((-(-kn // NP), 2), adt, what="q, k")
        qT = Act(Tile("sbuf", adt, 0, NP, qk.offset, qk.shape), sl.q_rows, 1)
        kT = Act(Tile("sbuf", adt, 0, NP, qk.offset + DTYPES[adt].size, qk.shape), kn, 1)
    else:
        qT = new_act(em, sl.q_rows, P, adt, "q")
    qr = new_act(em, sl.q_rows, P, adt, "q roped")
    if not paired:
        kT = new_act(em, kn, P, adt, "k")
    Kws = [em.sbuf((sl.k_chunks, C), adt, what="K window") for _ in range(S)]
    Vws = [em.sbuf((nvch, G * hd), adt, what="V window") for _ in range(S)]
    Kw, Vw = Kws[0], Vws[0]
    Knew = em.sbuf((sl.k_chunks, P), adt, what="new keys") if batched else Kw
    Vnew = em.sbuf((nb, G * hd), adt, what="new values") if batched else Vw
    attnT = new_act(em, sl.q_rows, P, "f32" if split else wdt, "attention out")
    attnS = new_act(em, sl.q_rows, P, wdt, "attention out, split", True) if split else attnT
    a = new_act(em, F, P, wdt, "ffn", split)
    cosT = em.sbuf((sl.hc, P), "f32", what="cos")
    sinT = em.sbuf((sl.hc, P), "f32", what="sin")
    kvbs = [em.sbuf((C,), "f32", what="window bias") for _ in range(S)]
    kvb = kvbs[0]
    # small machines (edge: 61 norms x 18 chunks = 4.4 KB of its 16 KB a partition) load each layer's
    # two norm vectors when the layer starts instead of keeping all of them resident
    norms_resident = (2 * Lc + 1) * nc * 4 <= cfg.sbuf_bytes_per_partition // 32
    norms = em.sbuf((2 * Lc + 1, nc), "f32", what="norm weights") if norms_resident else None

    def load_norms(i: int, n: int) -> Tile:
        """Norm vectors i..i+n-1 as a [P, n, nc] tile: the resident table's rows, or fetched now."""
        if norms_resident:
            return Tile("sbuf", "f32", 0, NP, norms.offset + 4 * i * nc, (n, nc))
        t = em.sbuf((n, nc), "f32", what="norm weights")
        em.dma(t[:, :, :], hbm["norms"].ap(i * NP * nc, NP, nc, [(n, NP * nc), (nc, 1)]))
        return t

    scales = em.sbuf((img.scale_chunks,), "f32", what="weight scales") if img.scale_chunks else None
    for w in [w for lw in img.weights for w in lw.values()] + [img.head]:
        w.scale_tile = None if w.chan_scale is None else \
            Tile("sbuf", "f32", 0, NP, scales.offset + 4 * w.scale_chunk0, (-(-w.n // NP),))
    # a batch's logits ([vocab, B] f32: 24 KB a partition for SmolLM2 at B = 16) before the ring is sized
    nl = P if batched else 1                     # rows whose logits come back
    lg = new_act(em, Vh, nl, "f32", "logits") if batched else None
    # logits over 1/8 of SBUF (edge: 6 KB a partition for SmolLM2's 49,152) go to HBM a PSUM group at a time
    stream_logits = not batched and -(-Vh // NP) * 4 > cfg.sbuf_bytes_per_partition // 8
    rot = em.sbuf((NP,), adt, what="rotation")
    idx = em.sbuf((nb, 2), "i32", what="ids, positions")
    reserve = 8 * nc * P + 4 * 2 * NP * 4 + cfg.sbuf_bytes_per_partition // 8     # core: 24 KB of scratch
    hole = max(hi - lo for lo, hi in em.sbuf_alloc.holes)
    ring_bytes = max(hole - reserve, 2 * img.ring_piece_bytes)
    ring = em.sbuf((ring_bytes,), "i8", what="weight ring")
    stream = WeightStream(em, ring, queues=tp.weight_queues if tp is not None else None)
    for w in [w for lw in img.weights for w in lw.values()] + [img.head]:
        for pc in w.pieces + (w.lo.pieces if w.lo is not None else []):
            pc.loaded = False                    # a build stopped by a full SBUF may have left pieces marked
    for lw in img.weights:
        if img.kv:
            stream.add(lw["kv"])
            stream.add(lw["q"])
        else:
            stream.add(lw["q"])
            stream.add(lw["k"])
            for _ in range(nb):                  # V is computed per block of 128 rows
                stream.add(lw["v"])
        stream.add(lw["o"])
        if "gu" in lw:
            stream.add(lw["gu"])
        else:
            stream.add(lw["gate"], lw["up"])
        stream.add(lw["down"])
    stream.add(img.head)

    with em.label(spec.embed.outputs[0].name):
        if norms_resident:
            em.dma(norms[:, :, :], hbm["norms"].ap(0, NP, nc, [(2 * Lc + 1, NP * nc), (nc, 1)]))
        if scales is not None:
            em.dma(scales[:, :], hbm["wscales"][0:NP, 0:img.scale_chunks])
        em.dma(rot[:, :], hbm["rot"][0:NP, 0:NP])
        for b, t in enumerate(kvbs):             # each sequence's validity row, on every partition
            em.dma(t[:, :], bias_t.ap(b * C, NP, 0, [(C, 1)]))
        em.memset(attnT.tile.ap(), 0.0)
        for b in range(nb):
            r0, r1 = b * NP, min(P, (b + 1) * NP)
            rn = r1 - r0
            em.dma(idx[0:rn, b, 0:1], ids_t.ap(r0, rn, 1, [(1, 1)]))
            em.dma(idx[0:rn, b, 1:2], pos_t.ap(r0, rn, 1, [(1, 1)]))
            xr = em.sbuf((D,), "f32", what="embedding rows")
            em.gather(xr[0:rn, :], hbm["embed"].ap(0, V, D, [(D, 1)]), idx[0:rn, b, 0:1])
            for c in range(nc):
                pc = min(NP, D - c * NP)
                em.transpose(x.tile[0:pc, c, r0:r1], xr[0:rn, c * NP:c * NP + pc])
            em.free(xr)
            rw = 2 * sl.hc * NP
            tr = em.sbuf((rw,), "f32", what="rope rows")
            em.gather(tr[0:rn, :], hbm["rope"].ap(0, img.max_pos, rw, [(rw, 1)]), idx[0:rn, b, 1:2])
            for ph in range(sl.hc):
                em.transpose(cosT[0:NP, ph, r0:r1], tr[0:rn, ph * NP:(ph + 1) * NP])
                em.transpose(sinT[0:NP, ph, r0:r1], tr[0:rn, (sl.hc + ph) * NP:(sl.hc + ph + 1) * NP])
            em.free(tr)

    kc, vc = (bkc, bvc) if batched else (hbm["kcache"], hbm["vcache"])
    kpieces = sl.k_pieces(hd)                    # where k^T holds each kv head (first copies are stored)
    GH = G * hd

    def v_rows(layer, lo, hi, slot0, store, seq=0):
        """Move cache rows [lo, hi) of `layer` <-> window slots [slot0, slot0 + hi - lo) (of sequence `seq`)."""
        Vw = Vws[seq]
        base = (seq * Lc + layer) * cmax * GH
        s, r = slot0, lo
        while r < hi:
            ch, p = divmod(s, NP)
            if p == 0 and hi - r >= NP:
                n = (hi - r) // NP
                dst_sb = Vw[0:NP, ch:ch + n, :]
                hb = vc.ap(base + r * GH, NP, GH, [(n, NP * GH), (GH, 1)])
                s, r = s + n * NP, r + n * NP
            else:
                n = min(NP - p, hi - r)
                dst_sb = Vw[p:p + n, ch, :]
                hb = vc.ap(base + r * GH, n, GH, [(GH, 1)])
                s, r = s + n, r + n
            em.dma(hb, dst_sb) if store else em.dma(dst_sb, hb)

    def k_cols(layer, piece, c0, c1, w0, store, seq=0):
        """cache K^T columns [c0, c1) of a k piece (rows of kv head g) <-> window columns [w0, ...)."""
        g, row0, n, j, st, _ = piece
        off = (((seq * Lc + layer) * G + g) * hd + row0) * cmax + c0
        hb = kc.ap(off, n, cmax, [(c1 - c0, 1)])
        sb = Kws[seq][st:st + n, j, w0:w0 + c1 - c0]
        em.dma(hb, sb) if store else em.dma(sb, hb)

    # a tensor-parallel decode step defers each layer norm's 1/rms past the linears it feeds (RowScale): on
    # the chip the norm follows an all-reduce on the critical path; one core streams weights slower than
    # it computes, and keeps the plain rmsnorm
    defer = tp is not None and P == 1 and not batched

    def norm(g: Tile, eps: float) -> RowScale | None:
        """h = rmsnorm(x) * g, or h = x * g and the deferred 1/rms (`defer`)."""
        if defer:
            return RowScale(em, consts, x, g, eps, h, mm_dtype=adt)
        rmsnorm(em, consts, x, g, eps, h, mm_dtype=adt)
        return None

    # (tensor-parallel decode) heads of one kv group in one chunk at different partition starts share one
    # score matmul and one p.V matmul: each head's q^T in its own column of a zeroed [P, heads] tile
    merged = _mergeable(sl, hd, NP) if defer else []
    for grp in merged:
        grp["qd"] = em.sbuf((1, len(grp["starts"])), adt, what="q, one head a column")
        em.memset(grp["qd"].ap(), 0.0)
    # (q and k paired) a merged group that holds every q row of its chunk gets its heads' roped q straight
    # into its columns (rope_pair's qouts), not through qr and a copy a head
    qouts = {}
    for grp in merged if paired else []:
        c, st = grp["chunk"], grp["starts"]
        if st[0] == 0 and st[-1] + hd == min(NP, sl.q_rows - c * NP):
            qouts[c] = [(s0, s0 + hd, grp["qd"][s0:s0 + hd, 0:1, i:i + 1]) for i, s0 in enumerate(st)]
            grp["placed"] = True

    if img.kv and batched:
        raise ValueError("a batched program on a stacked k/v weight (the chip's images) is not built")
    kcopies = [p for p in kpieces if not p[5]]

    def kv_evict(rs, later: list):
        """linear's evict for the stacked "kv" weight (one chunk: k^T's rows at partitions [0, hd), v^T's at
        [hd, 2 hd)): k^T into its first copy (1/rms applied, as linear's epilogue would), then its other
        copies (the score matmul of heads at other partition starts) and v's rows (row-major, the V
        window's new slot) through transposes: VECTOR/ACT lanes do not cross partitions. v's transposes
        go to `later` (the caller emits them after the rotary: on VECTOR they would hold up q's eviction
        and the rotary's products, which need k's copies but not v)."""
        def evict(c0, c1, r0, r1, srcs):
            R = r1 - r0
            src = srcs[0]
            sk = None if rs is None else rs.ap(hd)
            sv = None if rs is None else rs.ap(hd, hd)
            kdst = kT.tile[0:hd, 0:1, r0:r1]
            ksrc = _sub(src, 0, hd)
            em.copy(kdst, ksrc) if sk is None else em.act(kdst, ksrc, scale=sk)    # (ACT: VECTOR has the
            vt = em.sbuf((1, R), "f32", what="v^T")                                  # transposes)
            vsrc = _sub(src, hd, 2 * hd)
            em.copy(vt[hd:2 * hd, :, :], vsrc) if sv is None else em.act(vt[hd:2 * hd, :, :], vsrc, scale=sv)
            for b0 in range(0, R, NP):
                b1 = min(R, b0 + NP)
                for _, _, _, _, st, _ in kcopies:
                    kt_ = em.sbuf((hd,), adt, what="k^T moved")
                    em.transpose(kt_[0:b1 - b0, :], kT.tile[0:hd, 0, r0 + b0:r0 + b1])
                    em.transpose(kT.tile[st:st + hd, 0, r0 + b0:r0 + b1], kt_[0:b1 - b0, :])
                    em.free(kt_)

            def v_rows_out():
                for b0 in range(0, R, NP):
                    b1 = min(R, b0 + NP)
                    b, p0 = divmod(r0 + b0, NP)
                    vrow = Tile("sbuf", adt, 0, NP, Vnew.offset + b * GH * DTYPES[adt].size, (GH,))
                    em.transpose(vrow[p0:p0 + b1 - b0, 0:hd], vt[hd:2 * hd, 0, b0:b1])
                em.free(vt)
            later.append(v_rows_out)
        return evict

    scale = spec.scale
    for L, lw in zip(spec.layers, img.weights):
        l = L.index
        with em.label(L.k_cat.outputs[0].name):          # the cache's older part into the window
            if C > Pw:
                for seq in range(S):
                    for piece in kpieces:
                        k_cols(l, piece, cmax - C + Pw, cmax, Pw, False, seq)
        with em.label(L.v_cat.outputs[0].name):
            if C > Pw:
                for seq in range(S):
                    v_rows(l, cmax - C + Pw, cmax, Pw, False, seq)
        with em.label(L.attn_norm.outputs[0].name):
            lnorm = load_norms(2 * l, 2)
            rs = norm(_norm_tile(lnorm, 0, nc, NP), L.attn_norm.attrs["eps"])
        later = []              # v's rows from a stacked k/v weight: VECTOR work after the rotary's
        if img.kv:              # k and v stacked, first: their VECTOR work runs beside q's matmuls
            with em.label(L.k.outputs[0].name):
                linear(em, h, lw["kv"], stream, None, evict=kv_evict(rs, later), scale=rs)
            with em.label(L.q.outputs[0].name):
                linear(em, h, lw["q"], stream, qT, scale=rs)
            if rs is not None:
                rs.free()
        else:
            with shared_input(em, h) if share else contextlib.nullcontext():   # (blocked weights: x per block once)
                with em.label(L.q.outputs[0].name):
                    linear(em, h, lw["q"], stream, qT, scale=rs)
                with em.label(L.k.outputs[0].name):
                    linear(em, h, lw["k"], stream, kT, scale=rs)

        def v_linear():
            with em.label(L.v.outputs[0].name):
                for b in range(nb):
                    r0, r1 = b * NP, min(P, (b + 1) * NP)
                    linear_rows(em, h, lw["v"], stream, Tile("sbuf", adt, 0, NP, Vnew.offset + b * GH *
                                                              DTYPES[adt].size, (GH,)), r0, r1, scale=rs)
                if rs is not None:
                    rs.free()
                for seq in range(S if batched else 0):     # sequence b's new row: slot 0 of its window
                    ch, pp = divmod(seq, NP)
                    em.dma(Vws[seq][0:1, 0, :], Vnew[pp:pp + 1, ch, :])

        if not defer and not img.kv:
            v_linear()
        if paired:
            with em.label(L.q_rope.outputs[0].name):
                rope_pair(em, qk, kn, qr.tile, Knew, rot, cosT, sinT, qouts, fma=img.weight_option == "bf16")
        else:
            with em.label(L.q_rope.outputs[0].name):
                rope(em, qT, qr.tile, rot, cosT, sinT)
        with em.label(L.k_rope.outputs[0].name):
            if not paired:
                rope(em, kT, Knew, rot, cosT, sinT)
            for seq in range(S if batched else 0):     # sequence b's new key: column 0 of its window
                em.copy(Kws[seq][:, :, 0:1], Knew[:, :, seq:seq + 1])
        with em.label(L.v.outputs[0].name):
            for f in later:
                f()
        if defer and not img.kv:       # after the rotary matmuls: its VECTOR chain runs beside v's, not after them
            v_linear()
        with em.label(L.k_cat.outputs[0].name):          # the window back to the cache, oldest first
            for seq in range(S):
                for piece in sorted((p for p in kpieces if p[5]), key=lambda p: (p[0], p[1])):
                    if C > Pw:
                        k_cols(l, piece, cmax - C, cmax - Pw, Pw, True, seq)
                    k_cols(l, piece, cmax - Pw, cmax, 0, True, seq)
        with em.label(L.v_cat.outputs[0].name):
            for seq in range(S):
                if C > Pw:
                    v_rows(l, cmax - C, cmax - Pw, Pw, True, seq)
                v_rows(l, cmax - Pw, cmax, 0, True, seq)
        with em.label(L.attn.outputs[0].name):
            for seq in range(S if batched or P == 1 else 0):
                units = _units(sl, qr, attnT, hd, 1, col=seq)
                if merged:
                    units = _merge(em, units, merged, qr, attnT, hd)
                # decode: units at aligned rows, one softmax for all of them
                align = cfg.pe_partition_align
                batch, top = [], 0
                for u in units + [None]:
                    if u is None or top + u.m > NP:
                        attend(em, batch, Kws[seq], Vws[seq], kvbs[seq], hd, C, 1, scale, adt,
                               transposed=defer)
                        batch, top = [], 0
                    if u is not None:
                        u.row0 = top
                        batch.append(u)
                        top = -(-(top + u.m) // align) * align
            if not batched and P > 1:
                units = _units(sl, qr, attnT, hd, P)
                for u in units:
                    attend(em, u, Kw, Vw, kvb, hd, C, P, scale, adt)
            if split:
                split_into(em, attnS, attnT.tile[:, :, :], 0, attnT.chunks, 0, P)
        with em.label(L.o.outputs[0].name):
            if tp is None:
                linear(em, attnS, lw["o"], stream, x, epilogue="residual", residual=x)
            else:
                tp.reduce_linear(em, attnS, lw["o"], stream, x, reduce_slots, 2 * l)
        with em.label(L.ffn_norm.outputs[0].name):
            rs = norm(_norm_tile(lnorm, 1, nc, NP), L.ffn_norm.attrs["eps"])
            if not norms_resident:
                em.free(lnorm)
        with em.label(L.gate.outputs[0].name):           # (a deferred 1/rms: the gate's here, the up's in down)
            if "gu" in lw:
                linear(em, h, lw["gu"], stream, None, evict=GateUp(em, a, rs), scale=rs, group=1)
            else:
                linear(em, h, lw["gate"], stream, a, epilogue="swiglu", up=lw["up"], scale=rs,
                       group=1 if defer else None)
        with em.label(L.down.outputs[0].name):
            if tp is None:
                linear(em, a, lw["down"], stream, x, epilogue="residual", residual=x, scale=rs)
            else:
                tp.reduce_linear(em, a, lw["down"], stream, x, reduce_slots, 2 * l + 1, scale=rs, k_outer=defer)
            if rs is not None:
                rs.free()
    hl = new_act(em, D, nl, wdt, "last row", split)
    rs = None
    with em.label(spec.final_norm.outputs[0].name):
        if defer and not stream_logits:
            rs = RowScale(em, consts, x, _norm_tile(load_norms(2 * Lc, 1), 0, nc, NP), spec.final_norm.attrs["eps"],
                          hl, mm_dtype=adt)
        else:
            rmsnorm(em, consts, x, _norm_tile(load_norms(2 * Lc, 1), 0, nc, NP), spec.final_norm.attrs["eps"], hl,
                    P - nl, P, mm_dtype=adt)

    def logits_out(t: Tile, c0: int, c1: int) -> None:
        """Logit chunks [c0, c1) of every row, held in `t` from its chunk 0, to HBM."""
        full = min(c1, Vh // NP)
        for r in range(nl):
            if full > c0:
                em.dma(logits_t.ap(r * V + v0 + c0 * NP, NP, 1, [(full - c0, NP)]), t[0:NP, 0:full - c0, r])
            if c1 > full:                        # the last, partial chunk
                em.dma(logits_t.ap(r * V + v0 + full * NP, Vh % NP, 1, [(1, 1)]), t[0:Vh % NP, full - c0, r])

    def evict_logits(c0, c1, r0, r1, srcs):
        t = em.sbuf((c1 - c0, r1 - r0), "f32", what="logits")
        em.copy(t[:, :, :], srcs[0])
        logits_out(t, c0, c1)
        em.free(t)

    with em.label(spec.head.outputs[0].name):
        if stream_logits:
            linear(em, hl, img.head, stream, None, evict=evict_logits)
        else:
            lg = lg or new_act(em, Vh, nl, "f32", "logits")
            linear(em, hl, img.head, stream, lg, scale=rs)
            logits_out(lg.tile, 0, lg.chunks)
            if rs is not None:
                rs.free()
    prog = em.build()
    from isthmus.compiler.lower.npu.op_runner import memory_report
    prog.memory = memory_report(em)
    prog.memory["weight_ring"] = ring_bytes
    return prog


def _norm_tile(norms: Tile, i: int, nc: int, NP: int) -> Tile:
    return Tile("sbuf", "f32", 0, NP, norms.offset + 4 * i * nc, (nc,))


def _mergeable(sl: Slots, hd: int, NP: int) -> list[dict]:
    """Groups of query heads a decode step can attend with one score matmul: one head each at several
    partition starts of one q chunk, all of one kv group whose k^T copies sit at those starts of one k
    chunk, the starts tiling a partition range with no gap (so every partition the matmul contracts over
    holds a head's q or a zero against a live key): {"chunk", "starts", "group", "kchunk"}."""
    if sl.hc > 1 or sl.stride != hd:
        return []
    H = len(sl.head_slot)
    group = H // (max(g for row in sl.k_groups for g in row if g is not None) + 1)
    kpos = {(g, i * sl.stride): j for j, row in enumerate(sl.k_groups) for i, g in enumerate(row) if g is not None}
    by: dict[tuple, list[int]] = {}
    for h, (c, s) in enumerate(sl.head_slot):
        by.setdefault((c, h // group), []).append(s)
    out = []
    for (c, g), starts in sorted(by.items()):
        starts = sorted(starts)
        ks = {kpos.get((g, s)) for s in starts}
        tiled = starts == list(range(starts[0], starts[-1] + hd, hd))
        if len(starts) > 1 and len(ks) == 1 and None not in ks and tiled:
            out.append({"chunk": c, "starts": starts, "group": g, "kchunk": ks.pop()})
    return out


def _merge(em: Emitter, units: list[Unit], merged: list[dict], qr: Act, attnT: Act, hd: int) -> list[Unit]:
    """Replace the one-head units of each `_mergeable` group by one unit: copy each head's q^T into its
    column of the group's zeroed tile (the zeros keep the heads apart in the shared contraction)."""
    col = 0                                    # (tensor-parallel decode: one sequence, column 0)
    single = {(u.group, u.start, u.chunks[0]): u for u in units if u.chunks[1] == u.chunks[0] + 1}
    out = []
    taken = set()
    for grp in merged:
        c, starts, qd = grp["chunk"], grp["starts"], grp["qd"]
        if any((grp["group"], s, c) not in single for s in starts):
            continue                                   # a head attended in a run of chunks: leave it
        for i, s in enumerate(starts):
            if not grp.get("placed"):
                em.copy(qd[s:s + hd, 0, i:i + 1], qr.tile[s:s + hd, c, col:col + 1])
            taken.add(id(single[grp["group"], s, c]))
        s0 = starts[0]
        out.append(Unit([qd[s0:starts[-1] + hd, 0, 0:len(starts)]],
                        [attnT.tile[s:s + hd, c, col] for s in starts], [grp["kchunk"]], s0, grp["group"],
                        len(starts), 0, False, kparts=starts[-1] + hd - s0, row_out=True))
    return out + [u for u in units if id(u) not in taken]


def _units(sl: Slots, qr: Act, attnT: Act, hd: int, P: int, col: int = 0) -> list[Unit]:
    NP = qr.tile.parts
    units = []
    H = len(sl.head_slot)
    G = max(g for row in sl.k_groups for g in row if g is not None) + 1
    per_group = H // G
    kp = min(hd, NP)
    kpos = {}
    for j, row in enumerate(sl.k_groups[:len(sl.k_groups) // sl.hc]):
        for i, g in enumerate(row):
            if g is not None:
                kpos[(g, i * sl.stride)] = j

    def unit(g, s, ca, cb, r0, r1, per_query):
        """Heads in chunks [ca, cb) at partition s (one head, rows r0:r1, if per_query)."""
        q = [qr.tile[s:s + kp, ca + j * H:cb + j * H, col] if not per_query else qr.tile[s:s + kp, ca + j * H, r0:r1]
             for j in range(sl.hc)]
        out = [attnT.tile[s:s + kp, ca + j * H:cb + j * H, col] if not per_query
               else attnT.tile[s:s + kp, ca + j * H, r0:r1] for j in range(sl.hc)]
        ks = [kpos[(g, s)] + j * G for j in range(sl.hc)]
        return Unit(q, out, ks, s, g, (r1 - r0) if per_query else cb - ca, r0 if per_query else 0, per_query,
                    chunks=(ca, cb))

    if P == 1:
        by = {}
        for h, (c, s) in enumerate(sl.head_slot):
            by.setdefault((h // per_group, s), []).append(c)
        for (g, s), cs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            cs.sort()
            runs, run = [], [cs[0]]
            for c in cs[1:]:
                if c == run[-1] + 1:
                    run.append(c)
                else:
                    runs.append(run)
                    run = [c]
            runs.append(run)
            for run in runs:
                units.append(unit(g, s, run[0], run[-1] + 1, 0, 0, False))
        return units
    for h, (c, s) in enumerate(sl.head_slot):
        g = h // per_group
        for r0 in range(0, P, NP):
            units.append(unit(g, s, c, c + 1, r0, min(P, r0 + NP), True))
    return units
