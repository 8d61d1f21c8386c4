"""The simulated trusted execution environment (see docs/security.md; simulated, not hardware isolation).

    package.py       the sealed package (.isth): signed header, AES-256-GCM chunks, Merkle tree of the tags
    chunks.py        AES-256-GCM over the chunks on every core, in one pass
    payload.py       what a package carries: manifest, the model's files, program.ir behind a section table
    measurement.py   SHA-384 measurements in PCR-like registers
    attestation.py   the simulated platform (root CA, attestation key), reports, chains, policies
    keyrelease.py    the key release service (SQLite counters, nonces, owners, allow-lists)
    owner.py         the model owner's side: compile, register, seal
    enclave.py       the enclave session: the only holder of plaintext weights and conversations
    conversations.py conversation state; idle KV caches sealed and evicted under a budget
    kvstate.py       a decoder's KV cache as arrays and back
    crypto.py        canonical encoding, key files, X25519 key wrapping, best-effort zeroisation
    cli.py           `isthmus keygen | seal | attest | verify` and `chat | run | serve --sealed`
"""
