"""The grouped q4/q8 kernels (kernels/numba/grouped.py): a token's outputs are bitwise the same
alone and in batches of any size with random companions, and the AVX2 code computes the same bits
as the AVX-512 code (the integer sums are exact and the float steps the same)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from isthmus.compiler.ops import get_op  # noqa: E402
from isthmus.compiler.quant import quantize  # noqa: E402
from isthmus.kernels.numba import linear  # noqa: E402

pytestmark = pytest.mark.skipif(not linear.INT_ACTIVATIONS, reason="no AVX2 here: the weights stay in rows")


def _case(qtype, seed=7):
    rng = np.random.default_rng(seed)
    g, u = (quantize(rng.standard_normal((64, 256)).astype(np.float32), qtype) for _ in range(2))
    x = rng.standard_normal((16, 256)).astype(np.float32)
    res = rng.standard_normal((16, 64)).astype(np.float32)
    return g, u, x, res


def _outputs(qtype, sizes):
    """Each epilogue's outputs for rows of x computed in batches of the given sizes, in order."""
    g, u, x, res = _case(qtype)
    single, stacked = linear.pack(g), linear.pack([g, u])
    assert single.grouped and stacked.grouped
    ws = linear.Workspace()
    outs = {"none": [], "add": [], "swiglu": []}
    at = 0
    for n in sizes:
        xs, rs = x[at:at + n], res[at:at + n]
        outs["none"].append(linear.linear(xs, single, np.empty((n, 64), np.float32), ws, row_wise=True))
        outs["add"].append(linear.linear(xs, single, np.empty((n, 64), np.float32), ws, res=rs,
                                         epilogue=linear.EPI_ADD, row_wise=True))
        outs["swiglu"].append(linear.linear(xs, stacked, np.empty((n, 64), np.float32), ws,
                                            epilogue=linear.EPI_SWIGLU, row_wise=True))
        at += n
    return {k: np.concatenate(v) for k, v in outs.items()}


@pytest.mark.parametrize("qtype", ["q4_1", "q4_0", "q8_0"])
def test_a_token_is_bitwise_the_same_alone_and_in_any_batch(qtype):
    alone = _outputs(qtype, [1] * 16)
    g, u, x, res = _case(qtype)
    want = get_op("linear").reference(x, g)
    np.testing.assert_allclose(alone["none"], want, rtol=1e-4, atol=1e-4 * (1 + np.abs(want).max()))
    rng = np.random.default_rng(3)
    for sizes in ([16], [8, 8], [4, 4, 4, 4], [2, 7, 3, 4], [13, 1, 2], [9, 5, 2]):
        batched = _outputs(qtype, sizes)
        for k in alone:
            assert np.array_equal(batched[k], alone[k]), (qtype, sizes, k)
    # random companions: token 5's row computed beside others than its own batch-mates
    one = linear.pack(g)
    ws = linear.Workspace()
    for n in range(2, 17):
        companions = rng.standard_normal((n, 256)).astype(np.float32)
        companions[rng.integers(n)] = x[5]
        got = linear.linear(companions, one, np.empty((n, 64), np.float32), ws, row_wise=True)
        row = next(i for i in range(n) if np.array_equal(companions[i], x[5]))
        assert np.array_equal(got[row], alone["none"][5]), n


_AVX2_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_numba_grouped import _outputs
from isthmus.kernels.numba import grouped
assert not grouped.HAVE_VNNI and not grouped.WIDE, "the 256-bit path was not taken"
np.savez({out!r}, **{{q + "_" + k: v for q in ("q4_1", "q8_0") for k, v in _outputs(q, [3, 8, 4, 1]).items()}})
"""


@pytest.mark.slow
def test_avx2_code_gives_the_avx512_bits(tmp_path):
    """The 256-bit path (what a Zen 3 host runs) against this host's path: the same bits. Where this
    host has no AVX-512 both runs take the AVX2 code and the test still checks determinism."""
    out = tmp_path / "avx2.npz"
    script = _AVX2_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    env = dict(os.environ, ISTHMUS_NUMBA_AVX512="0", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=tmp_path, timeout=900)
    avx2 = np.load(out)
    for q in ("q4_1", "q8_0"):
        here = _outputs(q, [3, 8, 4, 1])
        for k, v in here.items():
            assert np.array_equal(avx2[f"{q}_{k}"], v), (q, k)
