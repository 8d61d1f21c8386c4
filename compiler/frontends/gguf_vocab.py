"""A GGUF vocabulary (`tokenizer.ggml.*`) rebuilt as a Hugging Face `tokenizers` backend.

GGUF has no tokenizer.json. It stores the tokens (with scores and token types), the merges of a
byte-level BPE, and names everything else by a label that llama.cpp (src/llama-vocab.cpp)
interprets. Two kinds of vocabulary are rebuilt here, each to tokenize as llama.cpp does:

- `tokenizer.ggml.model = "gpt2"`: byte-level BPE. `tokenizer.ggml.pre` names the regexes that
  cut text into words before BPE; each label maps to llama.cpp's list of regexes, applied in turn,
  each splitting the pieces of the one before (`Split(..., "isolated")`). An unknown label is an
  error: a wrong split still runs and silently gives other ids than the model was trained on.
- `tokenizer.ggml.model = "llama"`: SentencePiece (Llama 1/2, Mistral, Gemma, TinyLlama, ...).
  llama.cpp writes spaces as "▁", prepends one to every run of text when `add_space_prefix`
  (the default) and then merges, over the whole run, the adjacent pair whose joined text is the
  token of highest score; a character no token covers becomes its UTF-8 bytes as the tokens
  <0x00>..<0xFF>. That is BPE whose merges are every split of every token into two tokens,
  ranked by the score of the whole; the one difference is a tie between two tokens of equal
  score, which llama.cpp breaks by position and a merge list by rank (SentencePiece vocabularies
  give every normal piece its own score, so no tie arises).

Control and unknown-type tokens (`<s>`, `<|im_start|>`) become special added tokens, matched
whole where text spells them unless the caller asks otherwise; user-defined ones (`<think>`)
become plain added tokens, always matched whole, as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass

from isthmus.errors import ModelFormatError, UnsupportedError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types
SPACE = "\u2581"  # SentencePiece's visible space

# --- byte-level BPE pre-tokenizers (tokenizer.ggml.pre) -------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4E00-\u9FA5\u0800-\u4E00\uAC00-\uD7FF]+"
# DeepSeek LLM's cased letters, as its tokenizer.json (and llama.cpp) lists them
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00B5\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u01BA\u01BC-\u01BF\u01C4-\u0293\u0295-\u02AF"
    "\u0370-\u0373\u0376\u0377\u037B-\u037D\u037F\u0386\u0388-\u038A\u038C\u038E-\u03A1\u03A3-\u03F5"
    "\u03F7-\u0481\u048A-\u052F\u0531-\u0556\u10A0-\u10C5\u13A0-\u13F5\u13F8-\u13FD\u1C90-\u1CBA"
    "\u1CBD-\u1CBF\u1D00-\u1D2B\u1D6B-\u1D77\u1D79-\u1D9A\u1E00-\u1F15\u1F18-\u1F1D\u1F20-\u1F45"
    "\u1F48-\u1F4D\u1F50-\u1F57\u1F59\u1F5B\u1F5D\u1F5F-\u1F7D\u1F80-\u1FB4\u1FB6-\u1FBC\u1FBE"
    "\u1FC2-\u1FC4\u1FC6-\u1FCC\u1FD0-\u1FD3\u1FD6-\u1FDB\u1FE0-\u1FEC\u1FF2-\u1FF4\u1FF6-\u1FFC"
    "\u2102\u2107\u210A-\u2113\u2115\u2119-\u211D\u2124\u2126\u2128\u212A-\u212D\u212F-\u2134\u2139"
    "\u213C-\u213F\u2145-\u2149\u214E\u2183\u2184\u2C00-\u2C7B\u2C7E-\u2CE4\u2CEB-\u2CEE\u2CF2\u2CF3"
    "\uA640-\uA66D\uA680-\uA69B\uA722-\uA76F\uA771-\uA787\uA78B-\uA78E\uAB70-\uABBF\uFB00-\uFB06"
    "\uFB13-\uFB17\uFF21-\uFF3A\uFF41-\uFF5A\U00010400-\U0001044F\U000104B0-\U000104D3"
    "\U000104D8-\U000104FB\U00010C80-\U00010CB2\U00010CC0-\U00010CF2\U000118A0-\U000118DF"
    "\U0001E900-\U0001E943"
)
_DEEPSEEK_PUNCT = "!-/:-~\uFF01-\uFF0F\uFF1A-\uFF5E\u2018-\u201F\u3000-\u3002"
_BLOOM = r" ?[^(\s|.,!?" "\u2026\u3002\uFF0C\u3001\u0964\u06D4\u060C)]+"


@dataclass(frozen=True)
class PreTokenizer:
    """How one `tokenizer.ggml.pre` family cuts text before byte-level BPE."""

    regexes: tuple[str, ...] = ()   # applied in turn; empty: GPT-2's own regex (ByteLevel's)
    digits_first: bool = False      # every digit split off first (\p{N}), then GPT-2's regex
    ignore_merges: bool = False     # a word that is a whole token is that token, merges or not
    add_bos: bool = False           # llama.cpp's default when the file has no add_bos_token


_FAMILIES = {
    "gpt2": PreTokenizer(),
    "digits": PreTokenizer(digits_first=True),
    "llama3": PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    "llama3-merges": PreTokenizer((_LLAMA3,)),
    "qwen2": PreTokenizer((_QWEN2,)),
    "qwen35": PreTokenizer((_QWEN35,)),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    "gpt4o": PreTokenizer((_GPT4O,)),
    "deepseek-llm": PreTokenizer((r"[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", rf"\s?[{_DEEPSEEK_PUNCT}]+", r"\s+$",
                                  _CJK, r"\p{N}+")),
    "deepseek-coder": PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")),
    "deepseek-v3": PreTokenizer((r"\p{N}{1,3}", "[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+",
                                 r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
                                 r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                                 r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "bloom": PreTokenizer((_BLOOM,)),
    "viking": PreTokenizer((_BLOOM, r"\p{N}")),
}
# label -> family, as llama.cpp's llama_vocab::impl::load maps them ("gpt2" is no llama.cpp label;
# isthmus has long read it as "gpt-2"). A file without the key is GPT-2 split, as transformers
# reads it (llama.cpp warns and applies its "default" regexes).
PRE_TOKENIZERS = {
    None: "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "jais": "gpt2", "trillion": "gpt2", "exaone4": "gpt2", "gigachat": "gpt2", "mellum": "gpt2",
    "a.x-4.0": "gpt2", "granite-docling": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "command-r": "digits",
    "codeshell": "digits", "exaone": "digits", "minerva-7b": "digits", "mellum2": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "falcon3": "llama3",
    "falcon-h1": "llama3", "pixtral": "llama3", "midm-2.0": "llama3", "lfm2": "llama3",
    "dbrx": "llama3-merges", "smaug-bpe": "llama3-merges", "chatglm-bpe": "llama3-merges",
    "glm4": "llama3-merges",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "kormo": "qwen2", "f2llmv2": "qwen2",
    "megrez": "qwen2", "stablelm2": "qwen2", "hunyuan": "qwen2", "solar-open": "qwen2", "grok-2": "qwen2",
    "qwen35": "qwen35",
    "tekken": "tekken",
    "gpt-4o": "gpt4o", "llama4": "gpt4o", "kanana2": "gpt4o", "talkie": "gpt4o", "minimax-m2": "gpt4o",
    "deepseek-llm": "deepseek-llm", "deepseek-coder": "deepseek-coder", "deepseek-v3": "deepseek-v3",
    "hunyuan-dense": "deepseek-v3", "joyai-llm": "deepseek-v3",
    "falcon": "falcon", "default": "default",
    "bloom": "bloom", "poro-chat": "bloom", "gpt3-finnish": "bloom", "viking": "viking",
}


@dataclass
class Vocab:
    """What `Tokenizer` needs from a vocabulary: the backend, each token's bytes, and the flags."""

    backend: object
    token_bytes: list[bytes]
    special_ids: list[int]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    strip_space: bool     # decoding drops the one space encoding prepended (SentencePiece)


def build_vocab(md: dict, path: str) -> Vocab:
    kind = md.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return _byte_level(md, path)
    if kind == "llama":
        return _sentencepiece(md, path)
    raise UnsupportedError(f"{path}: tokenizer model {kind!r} is not supported; "
                           f"supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)")


def _byte_level(md: dict, path: str) -> Vocab:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from isthmus.compiler.frontends.tokenizer import _byte_alphabet, _token_bytes

    tokens = _string_list(md, "tokenizer.ggml.tokens", path)
    merges = _string_list(md, "tokenizer.ggml.merges", path)
    types = _types(md, tokens, path)
    pre = md.get("tokenizer.ggml.pre")
    family = PRE_TOKENIZERS.get(pre) if pre is None or isinstance(pre, str) else None
    if family is None:
        raise UnsupportedError(
            f"{path}: pre-tokenizer {pre!r} is not supported; supported: "
            f"{', '.join(sorted(k for k in PRE_TOKENIZERS if k))}"
        )
    split = _FAMILIES[family]

    spelled = _byte_alphabet()
    alphabet = {c: b for b, c in spelled.items()}
    # Tokens are spelled in GPT-2's byte alphabet; the odd one with other characters (an added
    # token holding a real space, say) is respelled, as transformers does, so BPE can reach it.
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab[tok if all(c in alphabet for c in tok) else "".join(spelled[b] for b in tok.encode())] = i
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelFormatError(f"{path}: merge {rank} ({merge[:40]!r}) is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False, ignore_merges=split.ignore_merges)
    except Exception as e:  # the Rust side raises plain Exception for merges outside the vocabulary
        raise ModelFormatError(f"{path}: the tokenizer merges do not fit its vocabulary ({e})") from None
    backend = Backend(bpe)
    if split.digits_first:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif not split.regexes:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split.regexes),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>) must match whole wherever they appear in the text; a control
    # token spelled outside the byte alphabet is a converter's mislabel and is left alone.
    control = [i for i, t in enumerate(types) if t == CONTROL and all(c in alphabet for c in tokens[i])]
    user = [i for i, t in enumerate(types) if t == USER_DEFINED and tokens[i] in vocab]
    rstrip = _rstrip_ids(md, tokens, [*control, *user])
    backend.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True, rstrip=i in rstrip)
                                for i in control])
    backend.add_tokens([AddedToken(tokens[i], normalized=False, special=False, rstrip=i in rstrip) for i in user])

    bos = _id(md, "tokenizer.ggml.bos_token_id", len(tokens), path)
    eos = _id(md, "tokenizer.ggml.eos_token_id", len(tokens), path)
    return Vocab(backend, [_token_bytes(tok, alphabet) for tok in tokens], control, bos, eos,
                 add_bos=_flag(md, "tokenizer.ggml.add_bos_token", split.add_bos, path),
                 add_eos=_flag(md, "tokenizer.ggml.add_eos_token", False, path), strip_space=False)


def _sentencepiece(md: dict, path: str) -> Vocab:
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as Backend

    tokens = _string_list(md, "tokenizer.ggml.tokens", path)
    types = _types(md, tokens, path)
    scores = md.get("tokenizer.ggml.scores")
    if scores is None:
        scores = [0.0] * len(tokens)
    elif (not isinstance(scores, list) or len(scores) != len(tokens)
          or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
        raise ModelFormatError(f"{path}: tokenizer.ggml.scores does not give one number per token")
    # Any tokenizer.ggml.merges are ignored, as llama.cpp ignores them: the scores rank the merges.
    vocab = {}
    for i, tok in enumerate(tokens):
        if vocab.setdefault(tok, i) != i:
            raise ModelFormatError(f"{path}: token {tok[:40]!r} appears twice in the vocabulary "
                                   f"(ids {vocab[tok]} and {i})")
    unk = _id(md, "tokenizer.ggml.unknown_token_id", len(tokens), path, default=0)
    bos = _id(md, "tokenizer.ggml.bos_token_id", len(tokens), path, default=1)
    eos = _id(md, "tokenizer.ggml.eos_token_id", len(tokens), path, default=2)

    bpe = models.BPE(vocab=vocab, merges=_merges_by_score(tokens, scores, vocab), dropout=None,
                     unk_token=tokens[unk] if unk is not None else None, fuse_unk=True, byte_fallback=True)
    backend = Backend(bpe)
    # Normalizers run on each stretch of text between added tokens, so every stretch gets its
    # "▁" prefix, as llama.cpp prefixes the text after each special token.
    prefix = _flag(md, "tokenizer.ggml.add_space_prefix", True, path)
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])

    special = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
    user = [i for i, t in enumerate(types) if t == USER_DEFINED]
    rstrip = _rstrip_ids(md, tokens, [*special, *user])
    backend.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True, rstrip=i in rstrip)
                                for i in special])
    backend.add_tokens([AddedToken(tokens[i], normalized=False, special=False, rstrip=i in rstrip) for i in user])
    return Vocab(backend, [_piece_bytes(tok, t) for tok, t in zip(tokens, types)], special, bos, eos,
                 add_bos=_flag(md, "tokenizer.ggml.add_bos_token", True, path),
                 add_eos=_flag(md, "tokenizer.ggml.add_eos_token", False, path), strip_space=prefix)


def _rstrip_ids(md: dict, tokens: list[str], ids: list[int]) -> set[int]:
    """The one per-token attribute llama.cpp sets that a GGUF cannot carry: in a model whose
    general.name says Phi-3, every special and user-defined token but <unk>, <s> and
    <|endoftext|> swallows the whitespace after it (Phi-3's tokenizer.json marks them rstrip)."""
    name = md.get("general.name")
    if not isinstance(name, str) or not any(k in name.lower() for k in ("phi-3", "phi3")):
        return set()
    return {i for i in ids if tokens[i] not in ("<unk>", "<s>", "<|endoftext|>")}


def _merges_by_score(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-scoring whole first (ties: lower id, then
    the split further left)."""
    ranked = []
    for i, tok in enumerate(tokens):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _piece_bytes(token: str, token_type: int) -> bytes:
    """The bytes a SentencePiece token stands for, as llama.cpp's token_to_piece: <0xAB> is the
    byte, a user-defined or control token its own text, any other "▁" -> space."""
    if token_type == BYTE and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    if token_type in (USER_DEFINED, CONTROL, UNKNOWN):
        return token.encode()
    return token.replace(SPACE, " ").encode()


def _types(md: dict, tokens: list[str], path: str) -> list[int]:
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens) or not all(type(t) is int for t in types):
        raise ModelFormatError(f"{path}: tokenizer.ggml.token_type does not give one integer per token")
    return types


def _string_list(md: dict, key: str, path: str) -> list[str]:
    value = md.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelFormatError(f"{path}: metadata {key} is missing or is not a list of strings")
    return value


def _flag(md: dict, key: str, default: bool, path: str) -> bool:
    value = md.get(key, default)
    if not isinstance(value, bool):
        raise ModelFormatError(f"{path}: metadata {key} is {value!r}, not a boolean")
    return value


def _id(md: dict, key: str, n: int, path: str, default: int | None = None) -> int | None:
    value = md.get(key)
    if value is None:
        return default if default is not None and default < n else None
    if type(value) is not int or not 0 <= value < n:
        raise ModelFormatError(f"{path}: metadata {key} is {value!r}, not a token id below {n}")
    return value
