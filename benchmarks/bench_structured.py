"""What a JSON-schema mask costs a decode step (issue 17's target: <= 15 % of decode time).

    python benchmarks/bench_structured.py [--tokens 64] [--rounds 5] [--target numba]

The default model answers the same prompt greedily, once free and once under a JSON schema
(runtime/constraints.py), each `--tokens` tokens (a schema whose strings are long enough never to
end early); every step's time is measured in this process: the decoder step, and the sampler's
choice with the mask computed and applied. Rounds alternate; the best of each is reported with
the mask's share of a constrained step.
"""

from __future__ import annotations

import argparse
import time

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"],
          "additionalProperties": False}


def run(exe, ids, params, n):
    from isthmus.runtime.sampling import Sampler

    sampler, dec = Sampler(params), exe.decoder()
    logits = dec.step(ids)
    step = choose = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        token = sampler(logits)
        t1 = time.perf_counter()
        logits = dec.step([token])
        step, choose = step + time.perf_counter() - t1, choose + t1 - t0
    return step / n, choose / n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--target", default="numba")
    args = ap.parse_args(argv)
    import isthmus
    from isthmus.models import pull
    from isthmus.runtime.constraints import Grammar
    from isthmus.runtime.sampling import SamplingParams

    exe = isthmus.compile(isthmus.load(str(pull(progress=False))), target=args.target)
    tok = exe.model.tokenizer
    vocab = exe.graph.decoder.resolve(exe.graph).logits.shape[-1]
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell a long story as JSON."}],
                                             add_generation_prompt=True))
    t0 = time.perf_counter()
    grammar = Grammar.json(tok, vocab, SCHEMA)
    build = time.perf_counter() - t0
    free, masked = [], []
    for _ in range(args.rounds):
        free.append(run(exe, ids, SamplingParams(max_tokens=args.tokens), args.tokens))
        masked.append(run(exe, ids, SamplingParams(max_tokens=args.tokens, grammar=grammar), args.tokens))
    f, m = min(free, key=sum), min(masked, key=sum)
    share = (m[1] - f[1]) / sum(m)
    print(f"default model, {args.target}, {args.tokens} tokens, best of {args.rounds} rounds; grammar built in "
          f"{build * 1e3:.0f} ms (tokenizer included, once per model)")
    print(f"free:        decode {f[0] * 1e3:.3f} ms + choose {f[1] * 1e6:.0f} us per token")
    print(f"JSON schema: decode {m[0] * 1e3:.3f} ms + choose and mask {m[1] * 1e6:.0f} us per token")
    print(f"the mask's share of a constrained step: {share * 100:.1f} %")
    return {"free": f, "masked": m, "share": share}


if __name__ == "__main__":
    main()
