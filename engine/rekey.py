"""Key rotation on a live store: which key seals what (``sluice keys status``), and re-encryption
of every sealed column with the current key in small batches (``sluice keys rotate``).

Each batch is one short write transaction (on SQLite the committer waits for it a few
milliseconds; on PostgreSQL the rows are locked ``FOR UPDATE``), so a running engine goes on
receiving and delivering meanwhile.  The batch re-reads each value inside its transaction,
so a body that retention dropped a moment before stays dropped.  Plain values (written before
encryption was turned on) are sealed too: rotating is also how an existing store gets encrypted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from engine import keyring
from engine.errors import ConfigError
from engine.store import Store

# (table, id column, sealed columns with their purpose)
SEALED: tuple[tuple[str, tuple[tuple[str, bytes], ...]], ...] = (
    ("messages", (("raw", keyring.RAW), ("ack", keyring.ACK))),
    ("deliveries", (("payload", keyring.PAYLOAD),)),
)
_HEAD = 4 + 1 + 32  # frame prefix, id length, the longest key id


def status(store: Store) -> dict[str, Counter[str]]:
    """Per sealed column (``messages.raw``...): how many values each key id seals (``""``: plain)."""
    out: dict[str, Counter[str]] = {}
    with store.engine.connect() as conn:
        for table, cols in SEALED:
            for col, _ in cols:
                counts: Counter[str] = Counter()
                cur = store._cursor(conn)
                try:
                    cur.execute(f"SELECT substr({col}, 1, {_HEAD}) FROM {table} WHERE {col} IS NOT NULL")
                    while rows := cur.fetchmany(5000):
                        counts.update(keyring.key_id_of(bytes(r[0])) or "" for r in rows)
                finally:
                    cur.close()
                out[f"{table}.{col}"] = counts
    return out


@dataclass
class Rotated:
    table: str
    rows: int = 0  # rows rewritten
    values: int = 0  # values re-sealed in them


def rotate(
    store: Store,
    *,
    batch: int = 200,
    pause: float = 0.02,
    progress: Callable[[Rotated], None] | None = None,
) -> list[Rotated]:
    """Re-seal every value not sealed with the current key; batches of ``batch`` rows, ``pause`` s apart."""
    ring = store.keys
    if ring is None:
        raise ConfigError(
            "store_encryption is not configured: there is no key to rotate to",
            key="store_encryption",
            hint="add store_encryption: {key_file: PATH} to routes.yaml (sluice keys create --out PATH)",
        )
    header = ring.current_header()
    p = "?" if store.is_sqlite else "%s"
    lock = "" if store.is_sqlite else " FOR UPDATE"
    done: list[Rotated] = []
    for table, cols in SEALED:
        result = Rotated(table)
        stale = " OR ".join(f"({c} IS NOT NULL AND substr({c}, 1, {len(header)}) <> {p})" for c, _ in cols)
        select = (
            f"SELECT id, {', '.join(c for c, _ in cols)} FROM {table} WHERE id > {p} AND ({stale}) "
            f"ORDER BY id LIMIT {int(batch)}{lock}"
        )
        update = f"UPDATE {table} SET {', '.join(f'{c} = {p}' for c, _ in cols)} WHERE id = {p}"
        last = 0
        while True:
            with store.write() as conn:
                cur = store._cursor(conn)
                try:
                    cur.execute(select, [last, *([header] * len(cols))])
                    rows = cur.fetchall()
                    if not rows:
                        break
                    params = []
                    for row in rows:
                        values = []
                        for (_, purpose), v in zip(cols, row[1:], strict=True):
                            if v is not None and bytes(v[: len(header)]) != header:
                                v = ring.seal(keyring.unseal(ring, bytes(v), purpose), purpose)
                                result.values += 1
                            values.append(v)
                        params.append([*values, row[0]])
                    cur.executemany(update, params)
                finally:
                    cur.close()
            result.rows += len(rows)
            last = rows[-1][0]
            if progress is not None:
                progress(result)
            if pause:
                time.sleep(pause)
        done.append(result)
    return done
