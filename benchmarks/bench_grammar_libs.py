"""llguidance against xgrammar on the default model's vocabulary (issue 17 asks for the comparison
behind runtime/constraints.py's choice).

    pip install xgrammar      # not a dependency of isthmus: only this comparison needs it
    python benchmarks/bench_grammar_libs.py [--rounds 5]

For each library: building its tokenizer from the vocabulary (once per model), compiling each
schema, and the per-token mask along a document valid under the schema (the document's own
tokens, so both libraries walk the same path and must allow every token of it). Rounds alternate
between the libraries; the best round of each is reported.
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMAS = {
    "person": ({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "vip"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False}},
        "required": ["name", "age", "tags", "address"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["vip", "a"],
         "address": {"city": "London", "zip": "W1"}}),
    "story": ({"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"],
               "additionalProperties": False},
              {"story": "Once upon a time a small model learned to write JSON, one token at a time, "
                        "and it never once forgot to close its braces or quote its keys."}),
}
STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _doc_ids(tok, doc) -> list[int]:
    return tok.encode(json.dumps(doc, ensure_ascii=False), add_bos=False, add_eos=False)


def llguidance_walk(tok, vocab, schema, ids):
    import llguidance
    from isthmus.runtime.constraints import _ll_tokenizer
    import numpy as np

    ll = _ll_tokenizer(tok, vocab)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=STYLE)
    m = llguidance.LLMatcher(ll, grammar, log_level=0)
    compile_s = time.perf_counter() - t0
    mask = np.zeros((vocab + 31) // 32, np.int32)
    spent = 0.0
    for t in ids:
        t1 = time.perf_counter()
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        spent += time.perf_counter() - t1
        assert (mask[t // 32] >> (t % 32)) & 1, "llguidance refused a token of a valid document"
        assert m.consume_token(t)
    return compile_s, spent / len(ids)


def xgrammar_walk(info, vocab, schema, ids):
    import xgrammar as xgr

    t0 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False).compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    spent = 0.0
    for t in ids:
        t1 = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        spent += time.perf_counter() - t1
        assert (int(bitmask[0, t // 32]) >> (t % 32)) & 1, "xgrammar refused a token of a valid document"
        assert m.accept_token(t)
    return compile_s, spent / len(ids)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import isthmus
    import xgrammar as xgr
    from isthmus.models import pull
    from isthmus.runtime.constraints import _ll_tokenizer

    model = isthmus.load(str(pull(progress=False)))
    tok = model.tokenizer
    vocab = tok.vocab_size
    t0 = time.perf_counter()
    _ll_tokenizer(tok, vocab)
    ll_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo([tok.token_bytes(i) for i in range(vocab)], vocab_type=xgr.VocabType.RAW,
                             vocab_size=vocab, stop_token_ids=sorted(tok.stop_ids))
    xg_build = time.perf_counter() - t0
    print(f"vocabulary {vocab} tokens; tokenizer build: llguidance {ll_build * 1e3:.0f} ms, "
          f"xgrammar {xg_build * 1e3:.0f} ms")
    out = {"vocab": vocab, "build_ms": {"llguidance": ll_build * 1e3, "xgrammar": xg_build * 1e3}}
    for name, (schema, doc) in SCHEMAS.items():
        ids = _doc_ids(tok, doc)
        ll, xg = [], []
        for _ in range(args.rounds):
            ll.append(llguidance_walk(tok, vocab, schema, ids))
            xg.append(xgrammar_walk(info, vocab, schema, ids))
        (llc, llm), (xgc, xgm) = min(ll, key=lambda r: r[1]), min(xg, key=lambda r: r[1])
        print(f"{name:8s} {len(ids):3d} tokens  compile: llguidance {llc * 1e3:7.2f} ms, xgrammar {xgc * 1e3:7.2f} ms"
              f"   mask per token: llguidance {llm * 1e6:6.1f} us, xgrammar {xgm * 1e6:6.1f} us")
        out[name] = {"tokens": len(ids), "compile_ms": {"llguidance": llc * 1e3, "xgrammar": xgc * 1e3},
                     "mask_us": {"llguidance": llm * 1e6, "xgrammar": xgm * 1e6}}
    return out


if __name__ == "__main__":
    main()
