"""The SQLite state file: one store (connection, lock, schema), the ledger on it, the
outbox and its forwarder on the same store, and the outbox of HTTP messages (webhooks).

``from ichscan.state import StateStore, Ledger``; the outbox
(:mod:`ichscan.state.outbox`) and the forwarder (:mod:`ichscan.state.forwarder`) are
imported from their modules, as they pull in pydicom and pynetdicom; so are the message
outbox and its sender (:mod:`ichscan.state.messages`) and the delivery rounds both senders
share (:mod:`ichscan.state.rounds`).
"""

from ichscan.state.ledger import (
    CsvRepair,
    FileIdentity,
    InstanceResult,
    Ledger,
    LedgerEntry,
    LedgerError,
    decode_path,
    encode_path,
    printable,
    reconcile_csv,
)
from ichscan.state.store import DEFAULT_STATE_NAME, StateError, StateStore, state_files

__all__ = [
    "DEFAULT_STATE_NAME",
    "CsvRepair",
    "FileIdentity",
    "InstanceResult",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "StateError",
    "StateStore",
    "decode_path",
    "encode_path",
    "printable",
    "reconcile_csv",
    "state_files",
]
