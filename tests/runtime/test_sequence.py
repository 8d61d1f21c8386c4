"""The one generation core: budget, stop ids, stop strings cut (never half-released), UTF-8 holdback."""

import numpy as np

from isthmus.runtime.sampling import SamplingParams
from isthmus.runtime.sequence import Sequence


class _Tok:
    """Token i decodes to PIECES[i]; token 9 is a lone UTF-8 lead byte completed by token 8."""
    PIECES = {0: "Hello", 1: " Par", 2: "is", 3: " and", 5: "<eos>", 8: "\xe9"}

    def stream(self, skip_special=False):
        tok = self

        class Stream:
            held = b""

            def feed(self, i):
                if i == 9:
                    self.held = b"\xc3"
                    return ""
                if self.held and i == 8:
                    self.held = b""
                    return "é"
                return tok.PIECES[i]

            def flush(self):
                out, self.held = self.held.decode("utf-8", errors="replace"), b""
                return out
        return Stream()

    def token_bytes(self, i):
        return self.PIECES.get(i, "?").encode()


def _run(tokens, budget=10, stop=(), **kw):
    seq = Sequence(SamplingParams(stop=list(stop)), budget, stop_ids=frozenset({5}), tokenizer=_Tok(), **kw)
    out = []
    for t in tokens:
        out.append(seq.step(np.eye(10)[t]))
        if seq.finish_reason:
            break
    return out, seq.flush(), seq


def test_a_stop_string_is_held_back_then_cut():
    out, rest, seq = _run([0, 1, 2, 3], stop=["Paris"])
    assert out == ["Hello", " ", ""] and rest == "" and seq.finish_reason == "stop" and seq.generated == 3


def test_a_prefix_that_was_not_a_stop_string_is_released():
    out, rest, seq = _run([0, 1, 3], budget=3, stop=["Paris"])
    assert out == ["Hello", " ", "Par and"] and rest == "" and seq.finish_reason == "length"


def test_the_budget_releases_held_text_at_flush():
    out, rest, seq = _run([0, 1], budget=2, stop=["Paris"])
    assert out == ["Hello", " "] and rest == "Par" and seq.finish_reason == "length"


def test_a_stop_id_ends_without_being_kept():
    out, rest, seq = _run([0, 5, 3])
    assert out == ["Hello", ""] and seq.finish_reason == "stop" and not seq.kept and seq.generated == 1


def test_incomplete_utf8_is_held_until_complete():
    out, rest, seq = _run([9, 8, 5])
    assert out == ["", "é", ""] and rest == ""


def test_logprobs_are_kept_per_kept_token():
    out, rest, seq = _run([0, 5], top_logprobs=1)
    (entry,) = seq.take_logged()
    assert entry["token"] == "Hello" and entry["top_logprobs"][0]["token"] == "Hello" and seq.take_logged() is None
