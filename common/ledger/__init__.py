"""The epsilon ledger: each node's append-only, hash-chained, Ed25519-signed record of its privacy spending.

Format and semantics: docs/ledger.md. The modules, in the order a line goes through them:

- ``schema.py``: what an entry may contain (fields, types, limits, known values) and the tolerant JSON
  parser (:func:`~fedtune.common.ledger.schema.loads`); :func:`entry_problems` names every bad field.
- ``entry.py``: the typed entries: :class:`RoundEntry` (a round charged or refused, or a repair),
  :class:`PolicyEntry` (the header and policy changes, holding a :class:`LedgerHeader`) and the
  :class:`Seal` the ledger adds when it writes one; ``to_json()`` / ``from_json()`` are their JSON form.
- ``chain.py``: canonical JSON, entry hash, signature, and :func:`verify` of a parsed ledger (on the raw
  JSON objects, so the hash is checked over exactly what was signed).
- ``reader.py``: bounded reading of a ledger file (:func:`read`, :func:`parse_chunks`; the byte, line and
  line-length limits); every reader of a ledger goes through it.
- ``store.py``: the node's ledger file (:class:`Ledger`): locked, verified, checked against its witness,
  and appended to one signed entry at a time (:class:`LedgerSession`).
- ``witness.py``: the witness that catches a ledger rolled back to an older copy.
- ``receipts.py``: the server's signed run record and the nodes' signatures on their receipts.
- ``key.py``: the node's ledger-signing key and its node identity.

Torn-line repair is the node's alone (``client/ledger_repair.py``); the auditor is ``audit/``.
Nothing is re-exported here: import from the module that defines a name.
"""
