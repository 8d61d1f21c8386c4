"""Tiny models the tests (and the asv serving benchmark) build: random Llama weights named as in
GGUF, and a 2-layer chat model written as a GGUF file with a byte-level BPE vocabulary and a
ChatML template. One definition here, imported as `tiny_models` (pytest's pythonpath has
tests/support; only this folder, so tests/kernels cannot shadow the `kernels` package
transformers probes for)."""

from __future__ import annotations

import numpy as np

TINY_CONFIG = dict(n_layers=2, hidden=48, ffn=80, n_heads=6, n_kv_heads=2, head_dim=8, vocab_size=61,
                   rms_eps=1e-5, rope_theta=10000.0, context_length=64)


def tiny_llama_weights(config=TINY_CONFIG, seed=0, quant=None):
    """Random weights named as in GGUF; `quant` ("q8_0", ...) quantizes the linear layers."""
    from isthmus.compiler.quant import quantize

    rng = np.random.default_rng(seed)
    D, F, H, KVH, hd, V = (config[k] for k in ("hidden", "ffn", "n_heads", "n_kv_heads", "head_dim", "vocab_size"))

    def mat(rows, cols):
        m = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        return quantize(m, quant) if quant and cols % 32 == 0 else m

    w = {"token_embd.weight": rng.standard_normal((V, D)).astype(np.float32),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
         "output.weight": mat(V, D)}
    for i in range(config["n_layers"]):
        p = f"blk.{i}"
        w[f"{p}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[f"{p}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[f"{p}.attn_q.weight"] = mat(H * hd, D)
        w[f"{p}.attn_k.weight"] = mat(KVH * hd, D)
        w[f"{p}.attn_v.weight"] = mat(KVH * hd, D)
        w[f"{p}.attn_output.weight"] = mat(D, H * hd)
        w[f"{p}.ffn_gate.weight"] = mat(F, D)
        w[f"{p}.ffn_up.weight"] = mat(F, D)
        w[f"{p}.ffn_down.weight"] = mat(D, F)
    return w


def tiny_llama_model(config=TINY_CONFIG, seed=0, quant=None, layout="half", name="tiny"):
    """A decoder Model (no tokenizer) of `tiny_llama_weights`, ready for compile and `generate`."""
    from isthmus.compiler.frontends import Model
    from isthmus.compiler.frontends.llama import build_llama

    g = build_llama(config, tiny_llama_weights(config, seed=seed, quant=quant), rope_layout=layout, name=name)
    return Model(g, name, "test", dict(config))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "i n", "Ġ a", "e r", "o n"]
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that knows tools, in the Hermes convention (Qwen2.5, Qwen3, Hermes): the tools listed
# in the system turn, calls as <tool_call> JSON, results as <tool_response> in a user turn.
HERMES_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call functions. Their signatures are within <tools></tools> tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and loop.first %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}{{- '<|im_start|>assistant' }}"
    "{%- if m.content %}{{- '\n' + m.content }}{%- endif %}"
    "{%- for c in m.tool_calls %}{%- set f = c.function if c.function is defined else c %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CHAT_CONFIG = dict(n_layers=2, hidden=64, ffn=128, n_heads=4, n_kv_heads=2, head_dim=16, context_length=256)


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values (byte-level BPE)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def write_tiny_chat_gguf(path, seed=0, context_length=None, template=None):
    """A 2-layer random Llama with a real (tiny) tokenizer and chat template (default TEMPLATE,
    read when called), as a GGUF file (`context_length`: other than CHAT_CONFIG's, for prompts that
    need more room)."""
    import gguf

    tokens = SPECIALS + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]
    V, D, F = len(tokens), CHAT_CONFIG["hidden"], CHAT_CONFIG["ffn"]
    H, KVH, hd = CHAT_CONFIG["n_heads"], CHAT_CONFIG["n_kv_heads"], CHAT_CONFIG["head_dim"]
    rng = np.random.default_rng(seed)

    def mat(rows, cols, scale=1.0):
        return (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-chat")
    w.add_uint32("llama.context_length", context_length or CHAT_CONFIG["context_length"])
    w.add_uint32("llama.embedding_length", D)
    w.add_uint32("llama.block_count", CHAT_CONFIG["n_layers"])
    w.add_uint32("llama.feed_forward_length", F)
    w.add_uint32("llama.attention.head_count", H)
    w.add_uint32("llama.attention.head_count_kv", KVH)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_string("tokenizer.chat_template", template or TEMPLATE)
    out = mat(V, D, 4.0)           # sharp logits: greedy choices are far from ties
    out[2] *= 0.3                  # <|im_end|> is rare, so replies run to max_tokens mostly
    tensors = {"token_embd.weight": rng.standard_normal((V, D)).astype(np.float32),
               "output_norm.weight": np.ones(D, np.float32), "output.weight": out}
    for i in range(CHAT_CONFIG["n_layers"]):
        p = f"blk.{i}"
        tensors.update({
            f"{p}.attn_norm.weight": np.ones(D, np.float32), f"{p}.ffn_norm.weight": np.ones(D, np.float32),
            f"{p}.attn_q.weight": mat(H * hd, D), f"{p}.attn_k.weight": mat(KVH * hd, D),
            f"{p}.attn_v.weight": mat(KVH * hd, D), f"{p}.attn_output.weight": mat(D, H * hd),
            f"{p}.ffn_gate.weight": mat(F, D), f"{p}.ffn_up.weight": mat(F, D), f"{p}.ffn_down.weight": mat(D, F)})
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
