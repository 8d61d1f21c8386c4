"""Batched decoding (compiler/batch.py): one step for many KV caches equals a step per cache."""

import numpy as np
import pytest

import isthmus
from isthmus.compiler.batch import BatchPlan, decode_batch, plan_for, prefill, step_each
from isthmus.errors import InputError


@pytest.fixture
def ref_exe(tiny_model):
    return isthmus.compile(tiny_model, target="reference")


def _decoders(exe, lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        d = exe.decoder()
        d.step(list(rng.integers(0, 61, n)))
        out.append(d)
    return out


def test_batched_step_equals_per_request_steps_with_ragged_caches(ref_exe):
    lengths = [1, 5, 9, 2, 17]
    batched, single = _decoders(ref_exe, lengths), _decoders(ref_exe, lengths)
    assert plan_for(ref_exe) is not None
    for step in range(4):
        tokens = [(7 * step + 3 * i) % 61 for i in range(len(lengths))]
        got = decode_batch(ref_exe, batched, tokens)
        want = np.stack([d.step([t]) for d, t in zip(single, tokens)])
        assert got.shape == (len(lengths), 61)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        for a, b in zip(batched, single):
            assert a.length == b.length
            for name in a.cache.names:
                np.testing.assert_allclose(a.cache.arrays[name], b.cache.arrays[name], rtol=1e-4, atol=1e-5)


def test_equal_cache_lengths_and_a_batch_of_one(ref_exe):
    batched, single = _decoders(ref_exe, [4, 4, 4]), _decoders(ref_exe, [4, 4, 4])
    got = decode_batch(ref_exe, batched, [1, 2, 3])
    want = np.stack([d.step([t]) for d, t in zip(single, [1, 2, 3])])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    one, ref = _decoders(ref_exe, [6]), _decoders(ref_exe, [6])
    np.testing.assert_allclose(decode_batch(ref_exe, one, [9])[0], ref[0].step([9]), rtol=1e-4, atol=1e-5)


def test_prefill_through_the_plan_equals_a_decoder_step(ref_exe):
    ids = [3, 14, 15, 9, 26, 5]
    a, b = ref_exe.decoder(), ref_exe.decoder()
    np.testing.assert_allclose(prefill(ref_exe, a, ids), b.step(ids), rtol=1e-4, atol=1e-5)
    assert a.length == b.length == len(ids)
    np.testing.assert_allclose(decode_batch(ref_exe, [a], [1])[0], b.step([1]), rtol=1e-4, atol=1e-5)


def test_the_linear_layers_run_once_per_batched_step(ref_exe):
    """What makes B streams cheap: every linear node runs once for the batch, not once per request."""
    plan = plan_for(ref_exe)
    linear = [i for i, n in enumerate(ref_exe.graph.nodes) if n.op == "linear"]
    assert linear and not any(plan.per_request[i] for i in linear)
    per_request = {ref_exe.graph.nodes[i].op for i, each in enumerate(plan.per_request) if each}
    assert per_request == {"concat", "attention"}
    calls = []
    impls = plan.impls
    plan.impls = [(lambda f: (lambda *a, **k: calls.append(1) or f(*a, **k)))(f) if i in linear else f
                  for i, f in enumerate(impls)]
    try:
        decode_batch(ref_exe, _decoders(ref_exe, [2, 3, 4, 5]), [1, 2, 3, 4])
    finally:
        plan.impls = impls
    assert len(calls) == len(linear)


class _CountingDecoder:
    def __init__(self, vocab=5):
        self.length, self.vocab, self.fed = 0, vocab, []

    def step(self, ids):
        self.fed.append(list(ids))
        self.length += len(ids)
        return np.full(self.vocab, float(self.length), np.float32)


def test_generic_fallback_loops_over_step():
    class Exe:                   # an executable without decode_batch
        pass

    ds = [_CountingDecoder(), _CountingDecoder()]
    out = decode_batch(Exe(), ds, [4, 2])
    assert out.shape == (2, 5) and [d.fed for d in ds] == [[[4]], [[2]]]
    assert np.array_equal(step_each(ds, [1, 1]), np.full((2, 5), 2.0, np.float32))


def test_foreign_decoders_fall_back_on_the_reference_target(ref_exe):
    ds = [_CountingDecoder(), _CountingDecoder()]
    assert decode_batch(ref_exe, ds, [1, 2]).shape == (2, 5)
    assert [d.fed for d in ds] == [[[1]], [[2]]]


def test_mismatched_arguments_are_input_errors(ref_exe):
    with pytest.raises(InputError):
        decode_batch(ref_exe, _decoders(ref_exe, [2]), [1, 2])
    with pytest.raises(InputError):
        decode_batch(ref_exe, [], [])


def _decoder_graph(head):
    """A decoder graph (one cache layer, recorded interface) whose logits are head(graph, ids as f32)."""
    from isthmus.compiler.ir import DecoderInterface, Graph, KVLayer

    g = Graph("g")
    x = g.add_input("input_ids", ("batch", "seq"), "i64")
    g.add_input("position_ids", ("batch", "seq"), "i64")
    pk, pv = (g.add_input(n, ("batch", 1, "past", 1), "f32") for n in ("past_k", "past_v"))
    k = g.add("reshape", [g.add("cast", [x], {"to": "f32"})], {"shape": [0, 1, -1, 1]})
    kk, vv = g.add("concat", [pk, k], {"axis": 2}, name="kk"), g.add("concat", [pv, k], {"axis": 2}, name="vv")
    logits = head(g, g.add("cast", [x], {"to": "f32"}))
    g.set_outputs([logits, kk, vv])
    g.decoder = DecoderInterface("input_ids", logits.name, "position_ids", (KVLayer("past_k", "past_v", "kk", "vv"),))
    return g


def test_graphs_that_are_not_row_wise_get_no_plan():
    from isthmus.compiler.executable import Executable

    g = _decoder_graph(lambda g, y: g.add("transpose", [g.add("reshape", [y], {"shape": [0, 0, 1]})],
                                          {"perm": [1, 0, 2]}, name="out"))
    exe = Executable(g, "reference")
    with pytest.raises(ValueError, match="batch axis"):
        BatchPlan(exe)
    assert plan_for(exe) is None


def test_an_op_without_the_row_wise_trait_gets_no_plan():
    from isthmus.compiler.executable import Executable
    from isthmus.compiler.ops import ROW_WISE, get_op

    assert ROW_WISE in get_op("linear").traits and ROW_WISE not in get_op("reduce_sum").traits
    g = _decoder_graph(lambda g, y: g.add("reshape", [g.add("reduce_sum", [y], {"axes": [1]})], {"shape": [0, 1, 1]}))
    exe = Executable(g, "reference")
    with pytest.raises(ValueError, match="op reduce_sum is not known to be row-wise"):
        BatchPlan(exe)
    assert plan_for(exe) is None


def test_a_graph_without_a_recorded_decoder_interface_gets_no_plan():
    """Names alone (input_ids, logits) do not make a decoder: the frontend's record does."""
    from isthmus.compiler.executable import Executable

    g = _decoder_graph(lambda g, y: g.add("reshape", [y], {"shape": [0, 0, 1]}, name="logits"))
    g.decoder = None
    with pytest.raises(ValueError, match="not a decoder"):
        BatchPlan(Executable(g, "reference"))


def test_caches_grow_in_place_for_a_stable_batch_and_stay_immutable(ref_exe):
    ds = _decoders(ref_exe, [3, 7])
    decode_batch(ref_exe, ds, [1, 2])
    name = ds[0].cache.names[0]
    before = [d.cache.arrays[name] for d in ds]
    frozen = [a.copy() for a in before]
    decode_batch(ref_exe, ds, [3, 4])
    after = [d.cache.arrays[name] for d in ds]
    assert after[0].base is before[0].base is after[1].base       # one array, written in place
    assert after[0].shape[2] == before[0].shape[2] + 1
    for a, f in zip(before, frozen):
        np.testing.assert_array_equal(a, f)                        # what a caller held did not change


def test_batches_that_change_between_steps(ref_exe):
    """Requests join, leave, reorder and step alone between batched steps: always the serial answer."""
    lengths = [2, 6, 4]
    batched, single = _decoders(ref_exe, lengths), _decoders(ref_exe, lengths)
    schedule = [[0, 1, 2], [0, 1, 2], [2, 0], [1], [0, 1, 2], "solo0", [0, 1, 2], [1, 2, 0]]
    for step, which in enumerate(schedule):
        if which == "solo0":
            np.testing.assert_allclose(batched[0].step([5, 6]), single[0].step([5, 6]), rtol=1e-4, atol=1e-5)
            continue
        tokens = [(11 * step + i) % 61 for i in which]
        got = decode_batch(ref_exe, [batched[i] for i in which], tokens)
        want = np.stack([single[i].step([t]) for i, t in zip(which, tokens)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(batched, single):
        assert a.length == b.length
        for name in a.cache.names:
            np.testing.assert_allclose(a.cache.arrays[name], b.cache.arrays[name], rtol=1e-4, atol=1e-5)


def test_engines_on_threads_can_share_one_plan(ref_exe):
    import threading

    results, errors = {}, []

    def work(k):
        try:
            ds, ref = _decoders(ref_exe, [k + 1, k + 3], seed=k), _decoders(ref_exe, [k + 1, k + 3], seed=k)
            for step in range(6):
                got = decode_batch(ref_exe, ds, [step, k])
                want = np.stack([d.step([t]) for d, t in zip(ref, [step, k])])
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            results[k] = True
        except Exception as e:      # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
