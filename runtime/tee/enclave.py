"""The enclave session: the one object that holds plaintext weights and conversations.

    session = EnclaveSession(Platform.load_or_create(default_dir()), target="numba")
    session.load("model.isth", KeyReleaseService.local())     # attest, get the key, unseal, compile
    for piece in session.chat([{"role": "user", "content": "Hi"}], tenant="acme", conversation="c1"):
        ...

Start-up measures the runtime code and config into the registers (PCR0, PCR2) and makes a fresh
X25519 key pair; `load` measures the package's compiled-program digest (PCR1), sends a report
bound to the package to the key release service, unwraps the data key with the enclave's private
key, unseals the payload into an anonymous memory mapping, has the model's frontend (GGUF, ONNX or
safetensors) read its files in place from that mapping as they are decrypted, recompiles the graph
and checks the result is exactly the sealed (and measured) program, then lowers it for the target.

Simulated: this object lives in an ordinary process. The operator can read its memory, attach a
debugger, or read the platform keys; nothing is encrypted in RAM. What it does guarantee is the
data discipline: plaintext exists only in buffers this object owns, no code path writes it to a
file or a log, and `close` zeroises the buffers it can reach (best effort: Python and numpy make
copies that it cannot).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import MutableMapping

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from isthmus.errors import InputError, SealError
from isthmus.runtime.tee import measurement
from isthmus.runtime.tee.attestation import Platform, random_nonce
from isthmus.runtime.tee.conversations import DEFAULT_BUDGET, ConversationStore
from isthmus.runtime.tee.crypto import canonical, public_bytes, sha384, unwrap_with, zeroise
from isthmus.runtime.tee.keyrelease import key_request
from isthmus.runtime.tee.package import Package, Unsealing, read_header
from isthmus.runtime.tee.payload import FILE_PREFIX, LEGACY_GGUF, MANIFEST, PROGRAM, model_parts, views
from isthmus.runtime.tee.payload import spans as payload_spans


class EnclaveSession:
    def __init__(self, platform: Platform, *, target: str | None = None, debug: bool = False,
                 kv_budget_bytes: int = DEFAULT_BUDGET, blob_store: MutableMapping | None = None, audit=None,
                 batch_invariant: bool = False):
        from isthmus.compiler.targets import default_target
        self.platform, self.debug = platform, debug
        self.audit = audit                                  # an audit.AuditLog, or None: reports are not logged
        self.target = target or default_target()
        self.batch_invariant = batch_invariant        # compile_model's: every token as it would be alone
        self._key = X25519PrivateKey.generate()
        self._secret = bytearray(os.urandom(32))          # per-session root of the per-tenant keys
        self.registers = measurement.measure(None, self.target)
        self.package: Package | None = None
        self.exe = None
        self._buffer = None
        self._kv_budget, self._blob_store = kv_budget_bytes, blob_store
        self.conversations: ConversationStore | None = None
        self.timings: dict[str, float] = {}

    @property
    def public_key(self) -> bytes:
        return public_bytes(self._key)

    @property
    def pcrs(self) -> dict[str, str]:
        return self.registers.as_dict()

    def claim(self, nonce: bytes) -> bytes:
        """The user data of a report for a verifier: the verifier's nonce and the identity of the
        package this enclave measured (None before one is), whose digest PCR3 holds."""
        return canonical({"purpose": "attestation", "nonce": nonce.hex(),
                          "package": self.package.identity() if self.package is not None else None})

    def report(self, nonce: bytes, user_data: bytes | None = None) -> bytes:
        """A signed attestation report of this enclave: its registers, key, debug flag, and user data:
        the caller's, or by default `claim(nonce)`. Logged to the audit log when there is one."""
        if user_data is None:
            user_data = self.claim(nonce)
        raw = self.platform.sign_report(pcrs=self.pcrs, enclave_key=self.public_key, nonce=nonce,
                                        user_data=user_data, debug=self.debug)
        if self.audit is not None:
            h = self.package.header if self.package is not None else None
            self.audit.record("attestation", report_sha384=sha384(raw).hex(), nonce=nonce.hex(),
                              purpose=_purpose(user_data),
                              enclave_key=self.public_key.hex(), tenant=h and h.tenant, model=h and h.model,
                              version=h and h.version)
        return raw

    def measure_program(self, pkg: Package) -> None:
        """Measure a package before it is loaded: its compiled program into PCR1, its identity into PCR3."""
        if self.package is not None:
            raise InputError("this enclave session already runs a sealed model; start another session")
        self.registers.extend(measurement.PROGRAM, pkg.header.program_digest, "compiled program")
        self.registers.extend(measurement.PACKAGE, measurement.identity_digest(pkg.identity()), "package identity")
        self.package = pkg

    # -- loading ---------------------------------------------------------------------------------

    def load(self, source, kms, *, progress: bool = False) -> None:
        """Attest, obtain the data key from `kms` (anything with `release(report, header) -> bytes`),
        unseal, and compile. Any failure leaves no plaintext behind (best effort) and re-raises."""
        import time

        t0 = time.perf_counter()
        pkg = read_header(source)
        self.measure_program(pkg)
        report = self.report(random_nonce(), key_request(pkg))
        response = kms.release(report, pkg.signed_bytes())
        try:
            wrapped = json.loads(response)["wrapped"]
        except (ValueError, KeyError, TypeError):
            raise SealError("the key release service's answer is malformed") from None
        dek = unwrap_with(self._key, wrapped, sha384(report))
        t1 = time.perf_counter()
        try:
            opening = Unsealing(source, dek, name=pkg.name, progress=progress, alongside=True)
        finally:
            zeroise(dek)        # the cipher keeps its own schedule of the key
        self._buffer = opening.buffer
        try:
            if opening.package.digest != pkg.digest:
                raise SealError(f"{pkg.name}: the package changed while it was being opened")
            self.exe = self._compile(opening, pkg)
        except BaseException:
            opening.abort()
            self.close()
            raise
        self.conversations = ConversationStore(self.exe, self._secret, budget_bytes=self._kv_budget,
                                               blobs=self._blob_store)
        # unseal: the decryption's own time, which overlaps the compile (the frontend's parse
        # included); unseal wait: how long the compile waited for it
        self.timings = {"attest": t1 - t0, "unseal": opening.seconds, "unseal wait": opening.waited,
                        "compile": time.perf_counter() - t1}

    def _compile(self, opening: Unsealing, pkg: Package):
        """The model's frontend reads its files in place from the mapping while it is decrypted (the
        GGUF metadata and tokenizer before the weights); every chunk and the Merkle root are
        checked before the graph is compiled and compared with the sealed program."""
        from isthmus.compiler.frontends import Model
        from isthmus.compiler.frontends.memfiles import load_model_from
        from isthmus.compiler.ir_text import print_graph
        from isthmus.compiler.passes.pipeline import run_pipeline
        from isthmus.compiler.targets import compile_model

        h = pkg.header
        spans = payload_spans(opening.buffer, opening.ready)
        parts = views(opening.buffer, spans)
        if MANIFEST in spans:
            opening.ready(sum(spans[MANIFEST]))
        manifest, files = model_parts(parts, pkg.name)

        def ready(rel: str, n: int) -> int:
            start = spans[FILE_PREFIX + rel][0] if FILE_PREFIX + rel in spans else spans[LEGACY_GGUF][0]
            return opening.ready(start + n) - start

        # the frontend reads the model's files from the unsealed mapping, as it reads them on disk
        model = load_model_from(files, format=manifest["format"], entry=manifest["entry"], name=manifest["name"],
                                ready=ready)
        opening.finish()
        if PROGRAM not in parts:
            raise SealError(f"{pkg.name}: the payload lacks {PROGRAM}")
        sealed_program = str(parts[PROGRAM], "utf-8")
        if measurement.program_digest(sealed_program) != h.program_digest:
            raise SealError(f"{pkg.name}: the sealed program does not match the digest in the header")
        with _no_ir_dumps():
            graph = run_pipeline(model.graph)
        if print_graph(graph) != sealed_program:
            raise SealError(f"{pkg.name}: this runtime compiles the model to a different program than the "
                            "sealed one (sealed with another isthmus version?)")
        compiled = Model(graph, f"sealed {h.tenant}/{h.model} v{h.version}", model.format, model.config,
                         model.tokenizer)
        return compile_model(compiled, self.target, passes=[], batch_invariant=self.batch_invariant)

    # -- chatting --------------------------------------------------------------------------------

    def chat(self, messages: list[dict], *, tenant: str | None = None, conversation: str | None = None, **sampling):
        """Stream a reply. Without `conversation`, `messages` is the whole chat and nothing is kept.
        With one, `messages` are this turn's new messages: the enclave keeps the history and the KV
        cache of (tenant, conversation), resumes from the cached prefix, and seals idle conversations
        when the caches outgrow the budget."""
        from isthmus.runtime.generate import chat
        if self.exe is None:
            raise InputError("no sealed model is loaded in this enclave session")
        if conversation is None:
            return chat(self.exe, messages, **sampling)
        conv = self.conversations.open(tenant or self.package.header.tenant, conversation)
        if not isinstance(messages, list):
            raise InputError("messages must be a list of {role, content} objects")
        history = conv.messages + list(messages)
        stream = chat(_Resumed(self.exe, conv), history, **sampling)
        return _Turn(stream, conv, history, self.conversations)

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the model and conversations and zero what can be reached: the unsealed payload, the
        weights the target derived from it, the KV caches, the session secret."""
        if self.conversations is not None:
            self.conversations.close()
            self.conversations = None
        if self.exe is not None:
            _wipe_derived(self.exe)
            self.exe = None
        if self._buffer is not None:
            zeroise(self._buffer)
            self._buffer = None
        zeroise(self._secret)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Resumed:
    """What generation sees as the executable: the real one, whose decoder continues a conversation."""

    def __init__(self, exe, conv):
        self.exe, self.conv, self.model = exe, conv, exe.model

    def __getattr__(self, name):            # everything else (graph, target...) is the executable's
        return getattr(self.exe, name)

    def decoder(self):
        return _ConversationDecoder(self.exe, self.conv)


class _ConversationDecoder:
    """Feeds the prompt past the longest prefix the conversation's KV cache already holds."""

    def __init__(self, exe, conv):
        self.exe, self.conv, self.first = exe, conv, True

    @property
    def length(self) -> int:
        return len(self.conv.token_ids)

    def step(self, ids):
        from isthmus.runtime.tee import kvstate
        conv, ids = self.conv, list(ids)
        if self.first:
            self.first = False
            k = 0
            limit = min(len(conv.token_ids), len(ids) - 1)    # always feed one token to get logits
            while k < limit and conv.token_ids[k] == ids[k]:
                k += 1
            if conv.decoder is None or not kvstate.truncate(conv.decoder, k):
                if conv.decoder is not None:
                    kvstate.wipe(conv.decoder)
                conv.decoder, k = self.exe.decoder(), 0
            del conv.token_ids[k:]
            ids = ids[k:]
        logits = conv.decoder.step(ids)
        conv.token_ids.extend(ids)
        return logits


class _Turn:
    """One streamed turn of a conversation; records the reply and enforces the KV budget when done."""

    def __init__(self, stream, conv, history, store):
        self.stream, self.conv, self.history, self.store = stream, conv, history, store

    @property
    def stats(self):
        return self.stream.stats

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def token_ids(self) -> list[int]:
        return self.stream.token_ids

    def __iter__(self):
        self.conv.busy = True
        started = False
        try:
            for piece in self.stream:
                started = True
                yield piece
            started = True
        finally:
            self.conv.busy = False
            if started or self.stream.token_ids:    # a turn that failed before generating keeps no history
                self.conv.messages = self.history + [{"role": "assistant", "content": self.stream.text}]
            self.store.enforce_budget()


def _purpose(user_data: bytes) -> str:
    """What a report is for, as its user data says: "key-release", "attestation", or "other"."""
    try:
        doc = json.loads(user_data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "other"
    purpose = doc.get("purpose") if isinstance(doc, dict) else None
    return purpose if purpose in ("key-release", "attestation") else "other"


@contextlib.contextmanager
def _no_ir_dumps():
    """ISTHMUS_DUMP writes the IR after each pass to disk; the sealed program stays in memory."""
    saved = os.environ.pop("ISTHMUS_DUMP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ISTHMUS_DUMP"] = saved


def _wipe_derived(exe) -> None:
    """Zero the weight copies a target made (dequantized or packed), best effort."""
    import numpy as np

    def arrays(value, depth=0):
        if isinstance(value, np.ndarray):
            yield value
        elif depth < 2 and isinstance(value, (list, tuple)):
            for v in value:
                yield from arrays(v, depth + 1)
        elif depth < 2 and hasattr(value, "__dict__"):
            for v in vars(value).values():
                yield from arrays(v, depth + 1)

    for attr in ("_consts", "_packed"):
        table = getattr(exe, attr, None)
        if isinstance(table, dict):
            for value in table.values():
                for a in arrays(value):
                    if a.flags.writeable and a.flags.owndata:
                        a.fill(0)
