"""The hub's database: results (deferred ones are review cases), labels with history, reviewers, devices,
gait trial summaries (with the participant's pseudonym, never a name: issue 13), export and deletion by
pseudonym, retention.

One code path for SQLite (default) and PostgreSQL (psycopg 3), SQLAlchemy 2 Core. Writes are idempotent by
result or trial id (INSERT .. ON CONFLICT), so redelivered and replayed messages are stored exactly once.
Must not import paho, fastapi or torch.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from edgekit import incidents as incidents_mod
from edgekit import topics
from edgekit.contract.messages import Result, Review, Trial
from edgekit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

metadata = sa.MetaData()

results = sa.Table(
    "edgekit_results", metadata,
    sa.Column("id", sa.String(128), primary_key=True),  # "{device}:{seq:012d}", the idempotency key
    sa.Column("site", sa.String(128), nullable=False),
    sa.Column("device", sa.String(128), nullable=False),
    sa.Column("seq", sa.BigInteger),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("window_start_s", sa.Float),
    sa.Column("window_end_s", sa.Float),
    sa.Column("model_version", sa.String(128)),
    sa.Column("task", sa.String(64)),
    sa.Column("label", sa.String(128)),
    sa.Column("confidence", sa.Float),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reasons", sa.String(512), nullable=False),  # ",ood,disagreement," so LIKE '%,ood,%' filters
    sa.Column("probs", sa.Text),  # JSON texts below (orjson; decoded by the reader)
    sa.Column("second_opinion", sa.Text),
    sa.Column("scores", sa.Text),
    sa.Column("thresholds", sa.Text),
    sa.Column("features", sa.Text),  # from the review message; NULL until it arrives
    sa.Column("signal", sa.Text),
    sa.Column("replayed", sa.Boolean, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("attribution", sa.Text),  # JSON {channel or feature: share}; added after the table (ADDED_COLUMNS)
    sa.Column("percentiles", sa.Text),  # JSON {feature: 0-100} from the review; added after the table (issue 15)
    sa.Column("relative", sa.Text),  # JSON {feature: value} relative to the device's baseline, from the review
    sa.Index("ix_edgekit_results_decision_ts", "decision", "ts"),
    sa.Index("ix_edgekit_results_device", "site", "device"),
)

labels = sa.Table(
    "edgekit_labels", metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("result_id", sa.String(128), sa.ForeignKey("edgekit_results.id"), nullable=False, index=True),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("reviewer", sa.String(128), nullable=False),
    sa.Column("note", sa.Text, nullable=False, default=""),
    sa.Column("labelled_at", sa.Float, nullable=False),
)

users = sa.Table(
    "edgekit_users", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("password", sa.String(512), nullable=False),  # auth.hash_password's self-describing string
    sa.Column("created_at", sa.Float, nullable=False),
)

devices = sa.Table(
    "edgekit_devices", metadata,
    sa.Column("site", sa.String(128), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("last_seen", sa.Float),  # newest payload ts of any message from the device
    sa.Column("state", sa.String(16)),  # online | offline, from the retained status / last will
    sa.Column("status_ts", sa.Float),
    sa.Column("model_version", sa.String(128)),
    sa.Column("queued", sa.BigInteger),
    sa.Column("dropped", sa.BigInteger),
    sa.Column("metrics", sa.Text),
    sa.Column("metrics_ts", sa.Float),
    sa.Column("signature", sa.String(16)),  # verified | unchecked, from the status; added after (ADDED_COLUMNS)
    sa.Column("rollout", sa.Text),  # JSON messages.Rollout from the status (issue 16); added after (ADDED_COLUMNS)
)

trials = sa.Table(
    "edgekit_trials", metadata,
    sa.Column("id", sa.String(128), primary_key=True),  # "{device}:{seq:012d}" as for results, the idempotency key
    sa.Column("site", sa.String(128), nullable=False),
    sa.Column("device", sa.String(128), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),  # the agent's clock when it segmented the trial
    sa.Column("payload", sa.Text, nullable=False),  # the whole edgekit.trial object as JSON (orjson)
    sa.Column("received_at", sa.Float, nullable=False),
    # The pseudonym (topics.parse_pseudonym), also in the payload; indexed for export and delete by pseudonym.
    # Added after the table: HubDB.create adds it to an older database.
    sa.Column("participant", sa.String(topics.PSEUDONYM_LEN)),
    sa.Index("ix_edgekit_trials_ts", "ts"),
    sa.Index("ix_edgekit_trials_participant", "participant"),
)

settings = sa.Table(
    "edgekit_settings", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Model rollouts (issue 16, edgekit/hub/deploy.py): one row per `edgekit deploy`, one per device it updates.
deployments = sa.Table(
    "edgekit_deployments", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # UTC time and 6 random hex digits
    sa.Column("site", sa.String(128), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),  # edgekit/contract/archive.py bundle_version
    sa.Column("model_version", sa.String(128)),
    sa.Column("sha256", sa.String(64), nullable=False),  # of the archive
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("archive", sa.LargeBinary, nullable=False),  # what /bundles/{id} serves
    sa.Column("canary", sa.Integer, nullable=False),
    sa.Column("watch_s", sa.Float, nullable=False),
    sa.Column("min_windows", sa.Integer, nullable=False),
    sa.Column("band", sa.Text, nullable=False),  # JSON {"deferral": [lo, hi], "quarantine": [lo, hi]}
    sa.Column("state", sa.String(16), nullable=False),  # canary | rolling | done | stopped
    sa.Column("reason", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

deployment_devices = sa.Table(
    "edgekit_deployment_devices", metadata,
    sa.Column("deployment", sa.String(64), sa.ForeignKey("edgekit_deployments.id"), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("phase", sa.String(8), nullable=False),  # canary | rest
    sa.Column("token_sha256", sa.String(64), nullable=False, index=True),  # the token itself is never stored
    sa.Column("state", sa.String(16), nullable=False),  # waiting | sent | a messages.ROLLOUT_STATES word | timed_out
    sa.Column("reason", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),
)


# Columns added after their table was first made: (table, column, SQL type, index name or None). HubDB.create
# adds each to a database made before it.
ADDED_COLUMNS = (
    (trials, "participant", f"VARCHAR({topics.PSEUDONYM_LEN})", "ix_edgekit_trials_participant"),  # issue 13
    (results, "attribution", "TEXT", None),  # issue 14: an ood deferral's make-up (JSON)
    (devices, "signature", "VARCHAR(16)", None),  # issue 16: whether the device checks its bundle's signature
    (devices, "rollout", "TEXT", None),  # issue 16: the device's model rollout (JSON messages.Rollout)
    (results, "percentiles", "TEXT", None),  # issue 15: a review's features in the training population (JSON)
    (results, "relative", "TEXT", None),  # a baseline bundle's review: its features relative to the baseline (JSON)
)


def engine_url(url: str) -> str:
    """sqlite:///hub.db as is; postgresql:// and postgres:// use the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if url.startswith(("sqlite:", "postgresql+psycopg:")):
        return url
    from edgekit.mqtt import redact_url

    raise ConfigError(f"database URL must start with sqlite:/// or postgresql:// (got {redact_url(url)!r})",
                      where="hub.db_url", hint="e.g. sqlite:///hub.db or postgresql://user@host/db")


def unusable_db(url: str, exc: Exception, what: str) -> ConfigError:
    """A database URL that cannot be parsed or opened, as one line naming it (password redacted; issue 16)."""
    from edgekit.mqtt import redact_url

    reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(f"{what}: {reason}", where=f"hub.db_url {redact_url(url)}",
                       hint="check the URL (sqlite:///FILE or postgresql://USER@HOST[:PORT]/DB) and that the "
                            "server is running and reachable")


def make_engine(url: str) -> sa.Engine:
    full = engine_url(url)
    try:
        return _make_engine(full)
    except (sa.exc.ArgumentError, ValueError) as exc:  # a URL SQLAlchemy cannot parse (e.g. a port 'abc')
        raise unusable_db(url, exc, "cannot parse the database URL") from None


def _make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        # 30 s busy timeout: two hub processes may write one file; WAL lets the web read meanwhile.
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                  use_insertmanyvalues=False)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def result_row(msg: Result, now: float) -> dict[str, Any]:
    """A parsed result as a results row (the contract validated it: edgekit/contract/messages.py)."""
    second = msg.second_opinion
    return {
        "id": msg.id, "site": msg.site, "device": msg.device, "seq": msg.seq, "ts": msg.ts,
        "window_start_s": msg.start_s, "window_end_s": msg.end_s, "model_version": msg.model_version,
        "task": msg.task, "label": msg.label, "confidence": msg.confidence, "decision": msg.decision,
        "reasons": "," + ",".join(msg.reasons) + "," if msg.reasons else "",
        "probs": _dumps(msg.probs),
        "second_opinion": _dumps(None if second is None else {"label": second.label, "probs": second.probs}),
        "scores": _dumps(msg.scores), "thresholds": _dumps(msg.thresholds), "features": None, "signal": None,
        "replayed": msg.replayed, "received_at": now,
        "attribution": None if msg.attribution is None else _dumps(msg.attribution), "percentiles": None,
        "relative": None,
    }


def review_row(msg: Review, now: float) -> dict[str, Any]:
    """A parsed review as a results row with its features and signal."""
    row = result_row(msg.result, now)
    row["features"] = _dumps(msg.features)
    row["signal"] = _dumps(msg.to_obj()["signal"])
    row["percentiles"] = None if msg.percentiles is None else _dumps(msg.percentiles)
    row["relative"] = None if msg.relative is None else _dumps(msg.relative)
    return row


def trial_row(msg: Trial, now: float) -> dict[str, Any]:
    """A parsed trial summary as a trials row (the summary kept whole as JSON)."""
    return {"id": msg.id, "site": msg.site, "device": msg.device, "ts": msg.ts, "payload": _dumps(msg.to_obj()),
            "received_at": now, "participant": msg.participant}


def trial_result_row(msg: Trial, now: float) -> dict[str, Any] | None:
    """A scored trial's answer as a results row under the trial's id (None for a trial without an answer),
    so labels, the review queue, `labels export` and deletion by pseudonym treat it as any other result.
    The window is the trial's span; the features are the answer's registry features; the signal is the
    trial's, when it was sent (a referral, a deferred answer). A trial answer has no thresholds."""
    a = msg.answer
    if a is None:
        return None
    return {
        "id": msg.id, "site": msg.site, "device": msg.device, "seq": msg.seq, "ts": msg.ts,
        "window_start_s": msg.trial.start_s, "window_end_s": msg.trial.end_s, "model_version": msg.model_version,
        "task": msg.task, "label": a.label, "confidence": a.confidence, "decision": a.decision,
        # The trial contract does not refuse a comma in a reason, which would split it in this column.
        "reasons": "," + ",".join(r.replace(",", ";") for r in a.reasons) + "," if a.reasons else "",
        "probs": _dumps(a.probs),
        "second_opinion": _dumps(None), "scores": _dumps(a.scores), "thresholds": _dumps({}),
        "features": _dumps(a.features), "signal": None if msg.signal is None else _dumps(msg.signal.to_obj()),
        "replayed": msg.replayed, "received_at": now, "attribution": None,
        "percentiles": _dumps(a.percentiles) if a.percentiles else None, "relative": None,
    }


@dataclass
class Batch:
    """What one ingest transaction writes: rows by kind, plus the device facts seen in them."""

    results: list[dict[str, Any]] = field(default_factory=list)
    reviews: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    status: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    metrics: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def see(self, site: str, device: str, ts: float | None) -> None:
        if ts is not None and ts > self.seen.get((site, device), float("-inf")):
            self.seen[(site, device)] = ts

    def __len__(self) -> int:
        return (len(self.results) + len(self.reviews) + len(self.trials) + len(self.status)
                + len(self.metrics))


@dataclass
class Stored:
    new_results: int = 0  # rows created (by a result, a review or a scored trial's answer)
    reviews: int = 0  # review messages written (new rows or merged into a result row)
    new_trials: int = 0  # trial rows created (a redelivered trial creates none)


class HubDB:
    """The hub's tables on one engine. Use as a context manager (disposes the pool)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._insert = sqlite.insert if self.dialect == "sqlite" else postgresql.insert
        cols: dict[str, Any] = {c.name: sa.bindparam(c.name) for c in results.columns}
        new = self._insert(results).values(cols)
        self._bulk = {
            "results": new.on_conflict_do_nothing(index_elements=["id"]),
            # A review merges into its result's row (whichever came first); a repeated review changes nothing.
            "reviews": new.on_conflict_do_update(
                index_elements=["id"], set_={"features": new.excluded.features, "signal": new.excluded.signal,
                                             "percentiles": new.excluded.percentiles,
                                             "relative": new.excluded.relative},
                where=results.c.features.is_(None)),
            "trials": self._insert(trials).values({c.name: sa.bindparam(c.name) for c in trials.columns})
            .on_conflict_do_nothing(index_elements=["id"]),
        }
        self._bulk_sql: dict[str, tuple[str, tuple[str, ...] | None]] = {}
        # Called after each committed store(batch) with its seconds (the hub's /metrics, edgekit/hub/observe.py).
        self.on_store: Callable[[Batch, float], None] | None = None

    def __enter__(self) -> HubDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    def create(self) -> None:
        """The tables, and the columns added since a table was first made (create_all makes missing
        tables, never missing columns): ADDED_COLUMNS."""
        try:
            metadata.create_all(self.engine)  # the first connection
        except sa.exc.DBAPIError as exc:
            raise unusable_db(self.url, exc, "cannot open the database") from None
        for table, column, sql_type, index in ADDED_COLUMNS:
            self._add_column(table, column, sql_type, index)

    def _add_column(self, table: sa.Table, column: str, sql_type: str, index: str | None) -> None:
        """ALTER TABLE .. ADD COLUMN for a database made before `column` existed (and its index)."""
        def has(conn: sa.Connection) -> bool:
            return column in {c["name"] for c in sa.inspect(conn).get_columns(table.name)}

        with self.engine.begin() as conn:
            if has(conn):
                return
        exists = "IF NOT EXISTS " if self.dialect == "postgresql" else ""
        make_index = f"CREATE INDEX IF NOT EXISTS {index} ON {table.name} ({column})" if index else None
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {exists}{column} {sql_type}"))
                if make_index:
                    conn.execute(sa.text(make_index))
        except sa.exc.OperationalError:  # SQLite: another hub process added it meanwhile
            with self.engine.begin() as conn:
                if not has(conn):
                    raise
                if make_index:
                    conn.execute(sa.text(make_index))
        log.info("hub.db_upgraded table=%s column=%s", table.name, column)

    def _many(self, conn: sa.Connection, kind: str, rows: list[dict[str, Any]]) -> int:
        """executemany of a prepared bulk statement on the driver's own cursor; returns rows changed.

        SQLAlchemy's executemany cost more than the database here: 23k rows/s vs 56k/s raw on SQLite, and
        on PostgreSQL its multi-VALUES pages spent most of their time in psycopg's query conversion (1.6k
        rows/s) where psycopg's pipelined executemany of one short statement does ~30k rows/s."""
        compiled = self._bulk_sql.get(kind)
        if compiled is None:
            c = self._bulk[kind].compile(dialect=self.engine.dialect)
            compiled = self._bulk_sql[kind] = (str(c), tuple(c.positiontup or ()) if c.positional else None)
        sql, keys = compiled
        params: list[Any] = [tuple(r[k] for k in keys) for r in rows] if keys else rows
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]  # checked out: never None
        try:
            cur.executemany(sql, params)
            return cur.rowcount
        except dbapi_error as exc:  # wrapped as SQLAlchemy would, so callers see OperationalError etc.
            raise sa.exc.DBAPIError.instance(sql, None, exc, dbapi_error) from exc
        finally:
            cur.close()

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn

    # --- ingest ------------------------------------------------------------------------------------

    def store(self, batch: Batch, now: float | None = None) -> Stored:
        """Write one batch in one transaction; safe to repeat (duplicates change nothing)."""
        out = Stored()
        now = time.time() if now is None else now
        t0 = time.perf_counter()
        ins = self._insert
        with self.engine.begin() as conn:
            if batch.results:
                out.new_results += self._many(conn, "results", _unique(batch.results))
            if batch.reviews:
                rows = _unique(batch.reviews)
                before = conn.execute(
                    sa.select(sa.func.count()).select_from(results)
                    .where(results.c.id.in_([r["id"] for r in rows]))).scalar_one()
                self._many(conn, "reviews", rows)
                out.reviews += len(rows)
                out.new_results += len(rows) - before
            if batch.trials:
                out.new_trials += self._many(conn, "trials", _unique(batch.trials))
            for (site, device), ts in sorted(batch.seen.items()):  # one lock order for every hub
                stmt = ins(devices).values(site=site, device=device, last_seen=ts)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["site", "device"], set_={"last_seen": ts},
                    where=sa.or_(devices.c.last_seen.is_(None), devices.c.last_seen < ts)))
            for (site, device), st in sorted(batch.status.items()):
                values = {"state": st["state"], "status_ts": st["ts"], "model_version": st.get("model_version"),
                          "queued": st.get("queued"), "dropped": st.get("dropped"), "signature": st.get("signature")}
                values = {k: v for k, v in values.items() if v is not None}
                if st.get("rollout") is not None:  # the last will carries none: the device's last word stands
                    values["rollout"] = _dumps(st["rollout"])
                stmt = ins(devices).values(site=site, device=device, **values)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["site", "device"], set_=_backlog_if_newer(values, devices.c.metrics_ts, st["ts"])))
            for (site, device), m in sorted(batch.metrics.items()):
                values = {"metrics": _dumps(m), "metrics_ts": m["ts"]}
                for key in BACKLOG:
                    if isinstance(m.get(key), int):
                        values[key] = m[key]
                stmt = ins(devices).values(site=site, device=device, **values)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["site", "device"], set_=_backlog_if_newer(values, devices.c.status_ts, m["ts"]),
                    where=sa.or_(devices.c.metrics_ts.is_(None), devices.c.metrics_ts <= m["ts"])))
        if self.on_store is not None:
            self.on_store(batch, time.perf_counter() - t0)
        return out

    # --- review ------------------------------------------------------------------------------------

    def cases(self, *, site: str | None = None, device: str | None = None, reason: str | None = None,
              status: str = "all", limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Deferred results, newest first, each with its latest label (or None)."""
        latest = _latest_labels()
        q = (sa.select(results.c.id, results.c.site, results.c.device, results.c.ts, results.c.label,
                       results.c.confidence, results.c.reasons, results.c.model_version,
                       results.c.features.is_not(None).label("has_review"),
                       latest.c.label.label("review_label"), latest.c.reviewer, latest.c.labelled_at)
             .select_from(results.outerjoin(latest, latest.c.result_id == results.c.id))
             .where(results.c.decision == "defer"))
        if site:
            q = q.where(results.c.site == site)
        if device:
            q = q.where(results.c.device == device)
        if reason:
            q = q.where(results.c.reasons.contains(f",{reason},", autoescape=True))
        if status == "unlabelled":
            q = q.where(latest.c.label.is_(None))
        elif status == "labelled":
            q = q.where(latest.c.label.is_not(None))
        q = q.order_by(results.c.ts.desc(), results.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for r in rows:
            r["reasons"] = _reasons(r["reasons"])
            r["has_review"] = bool(r["has_review"])
        return rows

    def facets(self) -> dict[str, list[str]]:
        """Distinct sites, devices and reasons among deferred results, for the queue's filters."""
        with self.engine.connect() as conn:
            pairs = conn.execute(sa.select(results.c.site, results.c.device, results.c.reasons)
                                 .where(results.c.decision == "defer").distinct()).all()
        return {"sites": sorted({p[0] for p in pairs}), "devices": sorted({p[1] for p in pairs}),
                "reasons": sorted({r for p in pairs for r in _reasons(p[2])})}

    def case(self, result_id: str) -> dict[str, Any] | None:
        """One result with decoded JSON fields and its label history (newest first)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(results).where(results.c.id == result_id)).first()
            if row is None:
                return None
            history = conn.execute(sa.select(labels).where(labels.c.result_id == result_id)
                                   .order_by(labels.c.labelled_at.desc(), labels.c.id.desc())).all()
        case = dict(row._mapping)
        for key in ("probs", "second_opinion", "scores", "thresholds", "features", "signal", "attribution",
                    "percentiles", "relative"):
            case[key] = _loads(case[key])
        case["reasons"] = _reasons(case["reasons"])
        case["labels"] = [dict(h._mapping) for h in history]
        return case

    def add_label(self, result_id: str, label: str, reviewer: str, note: str = "",
                  at: float | None = None) -> int:
        """Append a label (history is kept; the latest wins). Returns the label row id."""
        if not label.strip():
            raise DataError("label must not be empty", where=f"case {result_id}")
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(results.c.id).where(results.c.id == result_id)).first()
            if exists is None:
                raise DataError("no such result", where=f"case {result_id}")
            return conn.execute(labels.insert().values(
                result_id=result_id, label=label.strip(), reviewer=reviewer, note=note.strip(),
                labelled_at=time.time() if at is None else at).returning(labels.c.id)).scalar_one()

    # --- incidents (issue 15): deferred windows grouped at query time by edgekit/incidents.py ----------
    # Grouped when asked, from the stored rows alone: every hub process and both databases give the same
    # incidents for the same rows, and nothing needs updating when a late window joins or bridges two.

    def deferred_windows(self, *, site: str | None = None, device: str | None = None,
                         ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Deferred results, each with decoded scores and thresholds, its latest label (review_label, reviewer,
        labelled_at), whether its review arrived and whether it is a screening trial's answer; by site, device
        and start."""
        latest = _latest_labels()
        q = (sa.select(results.c.id, results.c.site, results.c.device, results.c.ts, results.c.window_start_s,
                       results.c.window_end_s, results.c.label, results.c.confidence, results.c.reasons,
                       results.c.scores, results.c.thresholds, results.c.received_at, results.c.model_version,
                       results.c.features.is_not(None).label("has_review"), trials.c.id.is_not(None).label("trial"),
                       latest.c.label.label("review_label"), latest.c.reviewer, latest.c.labelled_at)
             .select_from(results.outerjoin(latest, latest.c.result_id == results.c.id)
                          .outerjoin(trials, trials.c.id == results.c.id))
             .where(results.c.decision == "defer"))
        if site:
            q = q.where(results.c.site == site)
        if device:
            q = q.where(results.c.device == device)
        if ids is not None:
            q = q.where(results.c.id.in_(list(ids)))
        q = q.order_by(results.c.site, results.c.device, results.c.window_start_s, results.c.id)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        out = []
        for r in rows:
            r["reasons"] = _reasons(r["reasons"])
            r["scores"], r["thresholds"] = _loads(r["scores"]) or {}, _loads(r["thresholds"]) or {}
            r["has_review"], r["trial"] = bool(r["has_review"]), bool(r["trial"])
            out.append(r)
        return out

    def incidents(self, *, site: str | None = None, device: str | None = None, reason: str | None = None,
                  status: str = "unlabelled", gap_s: float | None = None,
                  now: float | None = None) -> dict[str, Any]:
        """The queue: incidents (edgekit/incidents.py `group` at `gap_s`, default the hub's setting) highest
        priority first, each with its windows' labels counted; kept when one of its windows gave `reason`
        and by `status` (unlabelled: some window has no label yet, a device learning its baseline's
        incidents left out: they wait for no label; labelled: every window has one; learning: those of a
        baseline being learned only; all). `totals`: incidents and windows waiting (unlabelled, not
        learning) over every incident of the site and device filters, the learning incidents, and incidents
        and windows in all."""
        now = time.time() if now is None else now
        gap = self.incident_gap_s() if gap_s is None else gap_s
        rows = self.deferred_windows(site=site, device=device)
        by_id = {r["id"]: r for r in rows}
        found = incidents_mod.ranked(incidents_mod.group((_deferred(r) for r in rows), gap), now)
        out, waiting, waiting_windows, learning = [], 0, 0, 0
        for inc in found:
            view = _incident_view(inc, [by_id[i] for i in inc.window_ids], now)
            learning += inc.learning
            if view["unlabelled"] and not inc.learning:
                waiting += 1
                waiting_windows += view["unlabelled"]
            if reason and not any(reason == r or reason == incidents_mod.reason_kind(r) for r in inc.reasons):
                continue
            if ((status == "unlabelled" and (not view["unlabelled"] or inc.learning))
                    or (status == "labelled" and view["unlabelled"]) or (status == "learning" and not inc.learning)):
                continue
            out.append(view)
        return {"incidents": out, "gap_s": gap,
                "totals": {"incidents": len(found), "windows": len(rows), "waiting": waiting,
                           "waiting_windows": waiting_windows, "learning": learning}}

    def incident(self, window_id: str, gap_s: float | None = None, now: float | None = None) -> dict[str, Any] | None:
        """The incident holding the deferred window `window_id` (found by any of its windows: an incident's
        id is its first window's, which a late earlier window changes), with every window's row in sensor
        time order (`members`: HubDB.deferred_windows' rows, plus signal, features, percentiles and
        attribution). None when `window_id` is no deferred window for review."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            where = conn.execute(sa.select(results.c.site, results.c.device)
                                 .where(results.c.id == window_id)).first()
        if where is None:
            return None
        gap = self.incident_gap_s() if gap_s is None else gap_s
        rows = self.deferred_windows(site=where.site, device=where.device)
        by_id = {r["id"]: r for r in rows}
        found = next((inc for inc in incidents_mod.group((_deferred(r) for r in rows), gap)
                      if window_id in inc.window_ids), None)
        if found is None:
            return None
        members = [by_id[i] for i in found.window_ids]
        extra = {}
        with self.engine.connect() as conn:
            for chunk in range(0, len(members), 500):
                ids = [m["id"] for m in members[chunk:chunk + 500]]
                for r in conn.execute(sa.select(results.c.id, results.c.signal, results.c.features,
                                                results.c.percentiles, results.c.attribution, results.c.probs)
                                      .where(results.c.id.in_(ids))):
                    extra[r.id] = {k: _loads(v) for k, v in r._mapping.items() if k != "id"}
        for m in members:
            m.update(extra.get(m["id"], {}))
        return {**_incident_view(found, members, now), "gap_s": gap, "members": members}

    def incident_ids(self) -> dict[str, str]:
        """Each deferred window a person reviews -> the id of its incident (at the hub's gap), for export."""
        found = incidents_mod.group((_deferred(r) for r in self.deferred_windows()), self.incident_gap_s())
        return {w: inc.id for inc in found for w in inc.window_ids}

    def add_labels(self, result_ids: Sequence[str], label: str, reviewer: str, note: str = "",
                   at: float | None = None) -> int:
        """One label for many windows (an incident's), in one transaction: every window gets its own label
        row with the same reviewer and time, so each carries who and when and can be relabelled alone.
        DataError (nothing stored) when the label is empty or a window is no deferred result. Returns the
        number of windows labelled."""
        if not label.strip():
            raise DataError("label must not be empty", where="incident")
        ids = list(dict.fromkeys(result_ids))
        if not ids:
            raise DataError("no windows to label", where="incident")
        when = time.time() if at is None else at
        with self.engine.begin() as conn:
            found: set[str] = set()
            for chunk in range(0, len(ids), 500):
                found.update(conn.execute(sa.select(results.c.id).where(
                    results.c.id.in_(ids[chunk:chunk + 500]), results.c.decision == "defer")).scalars())
            missing = [i for i in ids if i not in found]
            if missing:
                raise DataError(f"no such deferred result: {missing[0]}"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}",
                                where=f"incident {ids[0]}")
            conn.execute(labels.insert(), [{"result_id": i, "label": label.strip(), "reviewer": reviewer,
                                            "note": note.strip(), "labelled_at": when} for i in ids])
        return len(ids)

    def deferral_rates(self, hours: int = 24) -> list[dict[str, Any]]:
        """Per device, windows and deferred windows (for review) per hour of sensor time over the last
        `hours` hours before its newest window, newest hour first: {site, device, hours: [{hour_s, windows,
        deferred}]}. Sensor time: a replayed recording's hours are its own."""
        hour = (sa.func.floor(results.c.window_end_s / 3600.0) if self.dialect == "postgresql"
                else sa.cast(results.c.window_end_s / 3600.0, sa.BigInteger))  # SQLite: positive times, cast floors
        review = sa.and_(results.c.decision == "defer", results.c.reasons != ",commissioning,")
        newest = (sa.select(results.c.site, results.c.device, sa.func.max(results.c.window_end_s).label("newest"))
                  .group_by(results.c.site, results.c.device).subquery())
        q = (sa.select(results.c.site, results.c.device, hour.label("hour"), sa.func.count().label("windows"),
                       sa.func.sum(sa.case((review, 1), else_=0)).label("deferred"))
             .join(newest, sa.and_(newest.c.site == results.c.site, newest.c.device == results.c.device))
             .where(results.c.window_end_s.is_not(None), results.c.window_end_s >= 0,
                    results.c.window_end_s > newest.c.newest - hours * 3600.0)
             .group_by(results.c.site, results.c.device, hour))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            out.setdefault((r.site, r.device), []).append(
                {"hour_s": float(r.hour) * 3600.0, "windows": int(r.windows), "deferred": int(r.deferred or 0)})
        return [{"site": k[0], "device": k[1], "hours": sorted(v, key=lambda h: -h["hour_s"])}
                for k, v in sorted(out.items())]

    def setting(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(settings.c.value).where(settings.c.key == key)).scalar_one_or_none()

    def set_setting(self, key: str, value: str) -> None:
        stmt = self._insert(settings).values(key=key, value=value)
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": value}))

    def incident_gap_s(self) -> float:
        """The operator's gap between windows of one incident (setting `incident_gap_s`), else the default."""
        value = self.setting(INCIDENT_GAP_KEY)
        return incidents_mod.DEFAULT_GAP_S if value is None else float(value)

    def deferral_budget_per_h(self) -> float | None:
        """The operator's deferral budget: deferred windows per device and hour (None: not set)."""
        value = self.setting(BUDGET_KEY)
        return float(value) if value else None  # '' when the operator cleared it

    def labelled(self) -> Iterable[dict[str, Any]]:
        """Each labelled result with its latest label, oldest label first (for export)."""
        latest = _latest_labels()
        q = (sa.select(results, latest.c.label.label("review_label"), latest.c.reviewer,
                       latest.c.labelled_at, latest.c.note)
             .select_from(results.join(latest, latest.c.result_id == results.c.id))
             .order_by(latest.c.labelled_at, results.c.id))
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                row = dict(r._mapping)
                row["features"] = _loads(row["features"]) or {}
                row["relative"] = _loads(row["relative"])
                row["reasons"] = _reasons(row["reasons"])
                yield row

    def fleet(self) -> list[dict[str, Any]]:
        counts = (sa.select(results.c.site, results.c.device,
                            sa.func.count().label("results"),
                            sa.func.sum(sa.case((results.c.decision == "defer", 1), else_=0)).label("deferred"))
                  .group_by(results.c.site, results.c.device).subquery())
        q = (sa.select(devices, counts.c.results, counts.c.deferred)
             .select_from(devices.outerjoin(counts, sa.and_(counts.c.site == devices.c.site,
                                                              counts.c.device == devices.c.device)))
             .order_by(devices.c.site, devices.c.device))
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for r in rows:
            r["metrics"] = _loads(r["metrics"])
            r["rollout"] = _loads(r["rollout"])
            r["results"] = int(r["results"] or 0)
            r["deferred"] = int(r["deferred"] or 0)
        return rows

    def ping(self) -> None:
        """One round trip on a fresh connection; an OperationalError when the database cannot be reached. A
        SQLite file is opened anew (read-write, never created), so a file moved away or deleted fails here
        although the pool's open handles would still answer."""
        if self.dialect == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            path = str(self.engine.url.database)
            try:
                with closing(sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, timeout=5)) as conn:
                    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.Error as exc:
                raise sa.exc.OperationalError("SELECT count(*) FROM sqlite_master", None, exc) from None
            return
        with self.engine.connect() as conn:  # pool_pre_ping replaces a connection the server dropped
            conn.execute(sa.text("SELECT 1"))

    def watch_counts(self) -> dict[str, Any]:
        """What the hub's /metrics reads from its tables: devices per state (online, offline, unknown), the
        review queue (deferred results without a label) and the fleet's backlog and drops (each device's
        latest report, summed)."""
        labelled = sa.exists().where(labels.c.result_id == results.c.id)
        with self.engine.connect() as conn:
            states = conn.execute(sa.select(devices.c.state, sa.func.count(),
                                            sa.func.coalesce(sa.func.sum(devices.c.queued), 0),
                                            sa.func.coalesce(sa.func.sum(devices.c.dropped), 0))
                                  .group_by(devices.c.state)).all()
            queue = conn.execute(sa.select(sa.func.count()).select_from(results)
                                 .where(results.c.decision == "defer", ~labelled)).scalar_one()
        by_state = {"online": 0, "offline": 0, "unknown": 0}
        for state, n, _, _ in states:
            by_state[state if state in by_state else "unknown"] += int(n)
        return {"devices": by_state, "review_queue": int(queue), "queued": sum(int(r[2]) for r in states),
                "dropped": sum(int(r[3]) for r in states)}

    def count(self, decision: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(results)
        if decision:
            q = q.where(results.c.decision == decision)
        with self.engine.connect() as conn:
            return conn.execute(q).scalar_one()

    def trials(self, *, site: str | None = None, device: str | None = None, review: str = "all", limit: int = 50,
               offset: int = 0) -> list[dict[str, Any]]:
        """Stored trials, newest first: id, site, device, ts, received_at, participant, `summary` (the decoded
        edgekit.trial object), its answer's row facts (decision, label, confidence, reasons; None without an
        answer), its latest label (review_label, reviewer, labelled_at, note) and `needs_review`
        (_trial_needs_review). `review="needed"` keeps only the trials that need review."""
        q, needs = _trials_query()
        if site:
            q = q.where(trials.c.site == site)
        if device:
            q = q.where(trials.c.device == device)
        if review == "needed":
            q = q.where(needs)
        q = q.order_by(trials.c.ts.desc(), trials.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_trial_out(r._mapping) for r in conn.execute(q)]

    def trial(self, trial_id: str) -> dict[str, Any] | None:
        """One trial as `trials` lists it, plus `case` (HubDB.case of its answer's result row, with the label
        history; None for a trial without an answer)."""
        q, _ = _trials_query()
        with self.engine.connect() as conn:
            row = conn.execute(q.where(trials.c.id == trial_id)).first()
        if row is None:
            return None
        return {**_trial_out(row._mapping), "case": self.case(trial_id)}

    def is_trial(self, result_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(trials.c.id).where(trials.c.id == result_id)).first() is not None

    def count_trials(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(trials)).scalar_one()

    # --- privacy: export and delete by pseudonym, retention (issue 13) -----------------------------

    @staticmethod
    def _participant_rows(pseudonym: str) -> dict[sa.Table, sa.ColumnElement[bool]]:
        """Per table, what belongs to one pseudonym: its trials, and the results and labels filed under those
        trials' ids (an answer stored under its trial's id; results and trials share a device's sequence, so
        no other result has such an id). Children first: the order deletion takes."""
        ids = sa.select(trials.c.id).where(trials.c.participant == pseudonym)
        return {labels: labels.c.result_id.in_(ids), results: results.c.id.in_(ids),
                trials: trials.c.participant == pseudonym}

    def participant_export(self, pseudonym: str) -> dict[str, Any]:
        """Every row the hub holds for `pseudonym`, as stored: {"pseudonym", "tables": {table: [row, ...]}}
        (every table that can hold such a row is named, empty or not). DataError unless it is a pseudonym."""
        topics.parse_pseudonym(pseudonym)
        owned = self._participant_rows(pseudonym)
        with self.engine.connect() as conn:
            tables = {str(t.name): [{str(k): v for k, v in r._mapping.items()} for r in
                                    conn.execute(sa.select(t).where(where).order_by(*t.primary_key.columns))]
                      for t, where in reversed(owned.items())}  # str(): SQLAlchemy's quoted_name is not JSON's
        return {"pseudonym": pseudonym, "tables": tables}

    def participant_delete(self, pseudonym: str) -> dict[str, int]:
        """Delete every row of `pseudonym` (those `participant_export` returns) in one transaction; rows
        deleted per table. DataError unless it is a pseudonym."""
        topics.parse_pseudonym(pseudonym)
        with self.engine.begin() as conn:
            counts = {str(t.name): conn.execute(sa.delete(t).where(where)).rowcount
                      for t, where in self._participant_rows(pseudonym).items()}
        log.info("hub.participant_deleted %s", " ".join(f"{k}={v}" for k, v in counts.items()))
        return counts

    def delete_received_before(self, cutoff: float) -> dict[str, int]:
        """Retention: delete, in one transaction, the trials and results the hub received before `cutoff`
        (its own clock, received_at: a device's clock may be wrong by years), the results filed under those
        trials' ids, and the labels of every result deleted. Rows deleted per table."""
        old_trials = sa.select(trials.c.id).where(trials.c.received_at < cutoff)
        old_results = sa.or_(results.c.received_at < cutoff, results.c.id.in_(old_trials))
        with self.engine.begin() as conn:
            counts = {
                str(labels.name): conn.execute(sa.delete(labels).where(labels.c.result_id.in_(
                    sa.select(results.c.id).where(old_results)))).rowcount,
                str(results.name): conn.execute(sa.delete(results).where(old_results)).rowcount,
                str(trials.name): conn.execute(sa.delete(trials).where(trials.c.received_at < cutoff)).rowcount,
            }
        return counts

    # --- users and settings ------------------------------------------------------------------------

    def set_user(self, name: str, password_hash: str) -> None:
        stmt = self._insert(users).values(name=name, password=password_hash, created_at=time.time())
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=["name"],
                                                    set_={"password": password_hash}))

    def user_password(self, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(users.c.password).where(users.c.name == name)).scalar_one_or_none()

    def secret(self, key: str = "session_secret") -> str:
        """A random secret created once and shared by every hub process on this database."""
        stmt = self._insert(settings).values(key=key, value=secrets.token_urlsafe(32))
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["key"]))
            return conn.execute(sa.select(settings.c.value).where(settings.c.key == key)).scalar_one()


BACKLOG = ("queued", "dropped")  # a device's outbox facts, which its status and its metrics both report


def _backlog_if_newer(values: dict[str, Any], other_ts: sa.ColumnElement[Any], ts: float) -> dict[str, Any]:
    """The update of a device's row by its status or its metrics (`values`), whose queued and dropped apply only
    when the message is at least as new (device clock) as the device's latest report of the other kind: the
    fleet's backlog is the latest report's. A retained status (the broker's copy of the birth, with the
    backlog the device had when it connected, delivered again on every subscribe) or a metrics message replayed
    from the device's outbox must not undo a newer report's queued=0 (issue 16)."""
    newer = sa.or_(other_ts.is_(None), other_ts <= ts)
    return {k: sa.case((newer, sa.literal(v, sa.BigInteger)), else_=devices.c[k]) if k in BACKLOG else v
            for k, v in values.items()}


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """First row per id: PostgreSQL refuses one statement touching the same key twice."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["id"], r)
    return list(seen.values())


def _reasons(text: str) -> list[str]:
    return [r for r in text.split(",") if r]


def _trials_query() -> tuple[sa.Select[Any], sa.ColumnElement[bool]]:
    """Trials with their answer's row, latest label and needs_review; and the needs_review condition."""
    latest = _latest_labels()
    needs = _trial_needs_review(latest)
    q = (sa.select(trials, results.c.decision, results.c.label, results.c.confidence, results.c.reasons,
                   latest.c.label.label("review_label"), latest.c.reviewer, latest.c.labelled_at, latest.c.note,
                   needs.label("needs_review"))
         .select_from(trials.outerjoin(results, results.c.id == trials.c.id)
                      .outerjoin(latest, latest.c.result_id == trials.c.id)))
    return q, needs


def _trial_out(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["summary"] = _loads(out.pop("payload"))
    out["reasons"] = None if out["reasons"] is None else _reasons(out["reasons"])
    out["needs_review"] = bool(out["needs_review"])
    return out


def _trial_needs_review(latest: sa.Subquery) -> sa.ColumnElement[bool]:
    """A trial a clinician must see and nobody has labelled: its answer was deferred, or referred (an accepted
    answer sent with the trial's signal: the agent sends the signal exactly with a referral - the answer's
    `referred`, trial /3 - a deferred answer or a trial not scored, so the row's signal marks a referral of
    /2 and /3 alike), or it was not
    scored (no answer row; the key in its stored JSON: the contract's key names cannot appear there
    otherwise, as a string value's quotes are escaped)."""
    answered = sa.or_(results.c.decision == "defer", results.c.signal.is_not(None))
    unscored = sa.and_(results.c.id.is_(None), trials.c.payload.contains('"not_scored":', autoescape=True))
    return sa.and_(latest.c.label.is_(None), sa.or_(sa.and_(results.c.id.is_not(None), answered), unscored))


def _latest_labels() -> sa.Subquery:
    """Per result, its newest label row (ties broken by row id)."""
    ranked = sa.select(labels, sa.func.row_number().over(
        partition_by=labels.c.result_id, order_by=(labels.c.labelled_at.desc(), labels.c.id.desc()),
    ).label("rank")).subquery()
    return sa.select(ranked).where(ranked.c.rank == 1).subquery()


INCIDENT_GAP_KEY = "incident_gap_s"  # settings keys the operator sets on /settings (issue 15)
BUDGET_KEY = "deferral_budget_per_h"


def _deferred(row: dict[str, Any]) -> incidents_mod.Deferred:
    """A deferred row for incidents.group; a screening trial's answer is an incident of its own."""
    return incidents_mod.Deferred(row["id"], row["site"], row["device"], row["window_start_s"], row["window_end_s"],
                                  tuple(row["reasons"]), row["scores"], row["thresholds"], row["received_at"],
                                  alone=row["trial"])


def _incident_view(inc: incidents_mod.Incident, members: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """An incident as the queue and the incident page show it: the grouping's facts, its priority and the
    terms behind it, and its windows' labels (count per label; unlabelled windows) and model labels."""
    labelled = [m["review_label"] for m in members if m["review_label"] is not None]
    counts: dict[str, int] = {}
    for label in labelled:
        counts[label] = counts.get(label, 0) + 1
    said: dict[str, int] = {}
    for m in members:
        key = m["label"] or "-"
        said[key] = said.get(key, 0) + 1
    last = max(members, key=lambda m: (m["labelled_at"] or 0.0)) if labelled else None
    return {
        "id": inc.id, "site": inc.site, "device": inc.device, "start_s": inc.start_s, "end_s": inc.end_s,
        "windows": inc.windows, "window_ids": list(inc.window_ids), "reasons": inc.reasons, "worst": inc.worst,
        "thresholds": inc.thresholds, "severity": inc.severity, "risk": inc.risk, "age": inc.age(now),
        "priority": inc.priority(now), "last_received": inc.last_received, "learning": inc.learning,
        "unlabelled": inc.windows - len(labelled), "labels": counts, "model_labels": said,
        "has_review": all(m["has_review"] for m in members), "trial": any(m["trial"] for m in members),
        "model_version": members[0]["model_version"],
        "last_label": None if last is None else {"label": last["review_label"], "reviewer": last["reviewer"],
                                                 "labelled_at": last["labelled_at"]},
    }


def signal_window(stored: str | None) -> str:
    """A stored review signal as the labels export's `window` cell: JSON, one row per point of the channels'
    values (what `edgekit train --extra-labels` reads for a window model: the raw window when the agent sent
    every sample, gate.downsample_points >= the window's size); '' without a signal."""
    signal = _loads(stored)
    points = (signal or {}).get("points") or []
    if not points or not all(isinstance(ch, list) and len(ch) == len(points[0]) for ch in points):
        return ""
    return _dumps([list(row) for row in zip(*points)])
