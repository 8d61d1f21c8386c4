"""Batched decode on the numba target (`NumbaExecutable.decode_batch`): one step for B sequences,
each with its own KV cache and position, and each sequence's logits bitwise those of its decoder
stepping alone, whatever shares its batch. The oracle is the single-sequence decoder, itself
checked against the reference target (tests/kernels/test_numba_lowering.py)."""

import numpy as np
import pytest

pytest.importorskip("numba")

import isthmus  # noqa: E402
from isthmus.compiler.lower.numba import NumbaDecoder  # noqa: E402
from isthmus.errors import InputError  # noqa: E402
from tiny_models import tiny_llama_model  # noqa: E402  # tests/support

CFG = dict(n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=67,
           rms_eps=1e-5, rope_theta=10000.0, context_length=64)
STEPS = 6


def _gemma2():
    """A Gemma 2 file (soft-capping, a sliding window of 4, GQA): attention's variants batched."""
    import os
    import tempfile

    from hf_gguf import hf_model, write_gguf

    path = os.path.join(tempfile.mkdtemp(), "gemma2.gguf")
    write_gguf(hf_model("gemma2"), path, "gemma2")
    return isthmus.load(path)


def _kquant():
    """A Llama file quantized to Q4_K_M by llama.cpp (q4_k, q6_k and the q5_0/q8_0 fallbacks):
    the four-token kernels of each block format batched."""
    from pathlib import Path
    return isthmus.load(Path(__file__).resolve().parents[1] / "data" / "kquant_families" / "llama" / "q4_k_m.gguf")


MODELS = {
    "q4_1": lambda: tiny_llama_model(CFG, quant="q4_1"),
    "q4_k_m": _kquant,
    "q8_0": lambda: tiny_llama_model(CFG, quant="q8_0", layout="interleaved"),
    "f32": lambda: tiny_llama_model(CFG),                 # dense weights: BLAS one row at a time
    "gemma2": _gemma2,
}


@pytest.fixture(scope="module", params=list(MODELS))
def exe(request):
    return isthmus.compile(MODELS[request.param](), target="numba")


def _script(vocab, n, seed):
    """n sequences: (prompt, the tokens fed after it) of random lengths."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, int(rng.integers(1, 9))).tolist(), rng.integers(0, vocab, STEPS).tolist())
            for _ in range(n)]


def test_each_sequence_in_any_batch_is_bitwise_itself_alone(exe):
    vocab = exe.graph.decoder.resolve(exe.graph).logits.shape[-1]
    script = _script(vocab, 16, seed=1)
    alone = []
    for prompt, fed in script:
        dec = exe.decoder()
        assert isinstance(dec, NumbaDecoder)
        dec.step(prompt)
        alone.append([dec.step([t]).copy() for t in fed])
    decoders = []
    for prompt, _ in script:
        decoders.append(exe.decoder())
        decoders[-1].step(prompt)
    done = [0] * len(script)
    rng = np.random.default_rng(2)
    sizes = set()
    while any(d < STEPS for d in done):
        live = [i for i in range(len(script)) if done[i] < STEPS]
        pick = sorted(rng.choice(live, size=min(len(live), int(rng.integers(2, 17))), replace=False).tolist())
        if len(pick) == 1:                  # a batch of one is a plain step: covered above
            i = pick[0]
            got = [decoders[i].step([script[i][1][done[i]]]).copy()]
        else:
            got = exe.decode_batch([decoders[i] for i in pick], [script[i][1][done[i]] for i in pick])
            sizes.add(len(pick))
        for row, i in zip(got, pick):
            assert np.array_equal(row, alone[i][done[i]]), f"sequence {i}, step {done[i]}, batch of {len(pick)}"
            done[i] += 1
    assert max(sizes) >= 8 and min(sizes) <= 4            # both small and large batches were made
    assert [d.length for d in decoders] == [len(p) + STEPS for p, _ in script]


def test_long_sequences_in_a_batch_are_bitwise_themselves_alone(tmp_path):
    """Caches of up to a few hundred positions, companions of any length: attention's work items
    for a sequence are the same machine code batched or alone (a serial and a parallel compilation
    of them rounded differently past ~64 positions, 46 % of random cases)."""
    from tiny_models import write_tiny_chat_gguf

    exe = isthmus.compile(isthmus.load(write_tiny_chat_gguf(tmp_path / "chat.gguf", context_length=512)),
                          target="numba")
    rng = np.random.default_rng(5)
    lengths = [1, 40, 63, 64, 65, 79, 88, 100, 127, 128, 136, 150, 200, 255, 300]
    alone, batched = [], []
    for n in lengths:
        prompt = rng.integers(0, 200, n).tolist()
        a, b = exe.decoder(), exe.decoder()
        for d in (a, b):
            for t in prompt:                       # the same prefill path for both
                d.step([t])
        alone.append(a)
        batched.append(b)
    for step in range(3):
        tokens = rng.integers(0, 200, len(lengths)).tolist()
        want = [d.step([t]).copy() for d, t in zip(alone, tokens)]
        order = rng.permutation(len(lengths))
        got = exe.decode_batch([batched[i] for i in order], [tokens[i] for i in order])
        for row, i in zip(got, order):
            assert np.array_equal(row, want[i]), f"{lengths[i]} positions, step {step}"


@pytest.mark.parametrize("name", ["q4_1", "q8_0", "q4_k_m"])
def test_chunked_prefill_in_parts_of_tiles_is_bitwise_the_whole_prompt(name):
    """Block-quantized weights, default mode: a prompt within MATVEC_MAX_ROWS read in parts of
    TILES_MIN_SEQ tokens or more gives the next step the same bits as read whole: the row-wise
    linear kernels compute each token's dots alike four or one a pass, and attention's tile kernel
    each query alike in any part. (Parts of fewer tokens take the row attention kernel, which
    rounds differently; dense f32/f16 weights take BLAS for several tokens, whose rounding depends
    on how many. `--batch-invariant` covers those.)"""
    from isthmus.kernels.numba.attention_tiles import TILES_MIN_SEQ
    from isthmus.kernels.numba.linear import MATVEC_MAX_ROWS

    exe = isthmus.compile(MODELS[name](), target="numba")
    vocab = exe.graph.decoder.resolve(exe.graph).logits.shape[-1]
    n = min(15, MATVEC_MAX_ROWS)
    prompt = np.random.default_rng(3).integers(0, vocab, n).tolist()
    whole, chunked = exe.decoder(), exe.decoder()
    whole.step(prompt)
    cuts = (0, TILES_MIN_SEQ, n - TILES_MIN_SEQ - 1, n)
    for a, b in zip(cuts, cuts[1:]):
        assert b - a >= TILES_MIN_SEQ
        chunked.step(prompt[a:b])
    assert np.array_equal(whole.step([5]), chunked.step([5]))


def test_a_batch_past_a_cache_is_refused_before_anything_moves(exe):
    a, b = exe.decoder(), exe.decoder()
    a.step([1] * (a.capacity - 1))
    b.step([1])
    exe.decode_batch([a, b], [2, 3])                       # a's last position
    with pytest.raises(InputError, match="holds"):
        exe.decode_batch([b, a], [2, 3])
    assert (a.length, b.length) == (a.capacity, 2)


@pytest.mark.parametrize("target", ["numba", "reference"])
@pytest.mark.parametrize("name", ["q4_1", "q4_k_m", "f32"])
def test_batch_invariant_mode_gives_one_sequence_the_same_bits_alone_batched_and_chunked(name, target):
    """`batch_invariant=True` (issue 16, item 6): a sequence's logits are bitwise the same when it
    steps alone, in batches of 2-16 with random companions, and after its prompt (longer than the
    row kernels' MATVEC_MAX_ROWS and attention's BLAS_MIN_SEQ, where the default mode takes BLAS)
    was read whole or in arbitrary parts."""
    from isthmus.kernels.numba.attention import BLAS_MIN_SEQ
    from isthmus.kernels.numba.linear import MATVEC_MAX_ROWS

    exe = isthmus.compile(MODELS[name](), target=target, batch_invariant=True)
    vocab = exe.graph.decoder.resolve(exe.graph).logits.shape[-1]
    rng = np.random.default_rng(4)
    n = 2 * max(BLAS_MIN_SEQ, MATVEC_MAX_ROWS) + 5
    prompt = rng.integers(0, vocab, n).tolist()
    fed = rng.integers(0, vocab, 4).tolist()
    alone = exe.decoder()
    alone.step(prompt)
    want = [alone.step([t]).copy() for t in fed]
    cuts = sorted(rng.choice(np.arange(1, n), size=4, replace=False).tolist())
    for size in (1, 2, 7, 16):
        seq = exe.decoder()
        for a, b in zip([0, *cuts], [*cuts, n]):             # the prompt in five random parts
            seq.step(prompt[a:b])
        companions = []
        for _ in range(size - 1):
            c = exe.decoder()
            c.step(rng.integers(0, vocab, int(rng.integers(1, 30))).tolist())
            companions.append(c)
        for k, t in enumerate(fed):
            at = int(rng.integers(0, size))
            batch = companions[:at] + [seq] + companions[at:]
            tokens = [int(x) for x in rng.integers(0, vocab, size)]
            tokens[at] = t
            got = exe.decode_batch(batch, tokens)[at] if size > 1 else seq.step([t])
            assert np.array_equal(got, want[k]), f"batch of {size}, step {k}"


def test_batch_invariant_is_refused_where_it_is_not_built():
    from isthmus.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="batch-invariant"):
        isthmus.compile(tiny_llama_model(CFG, quant="q4_1"), target="npu", batch_invariant=True)


@pytest.mark.parametrize("name", ["q4_1", "f32"])
def test_prompt_bindings_shared_by_decoders_give_each_its_own_numbers(name):
    """A prompt part's binding is shared by the executable's decoders (re-pointed at each one's
    caches): prompts of the same length read by two decoders in turn, and one read at a yield point
    of the other's (the server's priority path), give each decoder what it gets with a binding of
    its own, checked against the reference target; the logits returned are the caller's to keep."""
    exe = isthmus.compile(MODELS[name](), target="numba")
    ref = isthmus.compile(MODELS[name](), target="reference")
    vocab = exe.graph.decoder.resolve(exe.graph).logits.shape[-1]
    rng = np.random.default_rng(7)
    p1, p2 = (rng.integers(0, vocab, 9).tolist() for _ in range(2))
    a, b = exe.decoder(), exe.decoder()
    la = a.step(p1)
    lb = b.step(p2)
    la_kept = la.copy()
    assert not np.shares_memory(la, lb) and np.array_equal(la, la_kept)
    want_a, want_b = a.step([3]).copy(), b.step([4]).copy()

    c, d = exe.decoder(), exe.decoder()
    inner = []
    lc = c.step(p1, between=lambda: inner or inner.append(d.step(p2)))     # d's prompt inside c's
    assert inner and np.array_equal(lc, la_kept) and np.array_equal(inner[0], lb)
    assert np.array_equal(c.step([3]), want_a) and np.array_equal(d.step([4]), want_b)

    for prompt, nxt, got in ((p1, 3, want_a), (p2, 4, want_b)):
        r = ref.decoder()
        r.step(prompt)
        np.testing.assert_allclose(got, r.step([nxt]), rtol=2e-3, atol=2e-3 * np.abs(got).max())


def test_the_thread_count_never_changes_the_numbers(exe, monkeypatch):
    """kernels/numba/threads.pace runs launches on fewer threads while other processes keep cores
    busy: a sequence's logits (a prompt of 40 tokens, read whole and in parts, then decode steps)
    are bitwise the same on one thread and on the whole pool."""
    import numba

    from isthmus.kernels.numba import threads

    monkeypatch.setattr(threads, "_USER_SET", True)        # the counts below, not pace's

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: a single thread count")
    vocab = exe.graph.decoder.resolve(exe.graph).logits.shape[-1]
    rng = np.random.default_rng(3)
    prompt, fed = rng.integers(0, vocab, 40).tolist(), rng.integers(0, vocab, STEPS).tolist()

    def run():
        out = []
        for parts in ([prompt], [prompt[:17], prompt[17:]]):
            dec = exe.decoder()
            for part in parts:
                out.append(np.array(dec.step(part), copy=True))
            out += [np.array(dec.step([t]), copy=True) for t in fed]
        return out

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        whole = run()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, whole):
        assert np.array_equal(a, b)
