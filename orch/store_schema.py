"""The DuckDB schema of orch.store (kept apart so store.py stays readable); only orch.store and orch.usage_log
import it.

Tables: ``ops`` (the ledger's event log), ``api_keys``, ``tenant_policies``, ``usage_log``. Views over ``ops``:
``tenants``, ``grants``, ``debits``, ``holds`` (with their end state); over ``usage_log``: ``usage`` (its ids as
text, what every read uses). Timestamps are UTC ``TIMESTAMP``s.
"""

import pyarrow as pa

SCHEMA_VERSION = 5

# orch.responses.new_id's prefixes: the ids stored as a kind and a UUID (orch.usage_log); any other is text.
REQUEST_KINDS = ("chatcmpl", "cmpl", "embd")
_KIND_ENUM = ", ".join(f"'{k}'" for k in REQUEST_KINDS)
OUR_ID = f"({'|'.join(REQUEST_KINDS)})-[0-9a-f]{{32}}"  # a full match is one of ours

# Tables first, then MIGRATIONS (a file of an older version has the tables without the newer columns),
# then VIEWS, which may read the newer columns.
TABLES = f"""
-- v5 added 'record' (DuckDB cannot add a value to an enum: the migration moves ops.kind to the new type).
CREATE TYPE IF NOT EXISTS op_kind_v5 AS ENUM ('create_tenant', 'grant', 'hold', 'settle', 'release', 'expire_holds',
                                              'record');
CREATE TYPE IF NOT EXISTS usage_status AS ENUM ('ok', 'error', 'aborted');
CREATE TYPE IF NOT EXISTS request_kind AS ENUM ({_KIND_ENUM});
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
-- No PRIMARY KEY/UNIQUE: the ledger enforces op_id uniqueness and an index would tax every insert.
CREATE TABLE IF NOT EXISTS ops (
    seq           BIGINT    NOT NULL,  -- apply order; replay follows it
    op_id         VARCHAR   NOT NULL,  -- also the grant_id / hold_id of grant / hold ops
    kind          op_kind_v5 NOT NULL,
    applied_at    TIMESTAMP NOT NULL,  -- UTC
    tenant_id     VARCHAR,             -- NULL for expire_holds
    hold_id       VARCHAR,             -- settle, release
    name          VARCHAR,             -- create_tenant
    micro_credits BIGINT,              -- granted / held / debited
    timeout_s     INTEGER,             -- hold
    released      BIGINT,              -- settle, release, expire_holds: micro-credits freed
    expires_at    TIMESTAMP,           -- grant, hold (UTC)
    hold_ids      VARCHAR[],           -- expire_holds: the holds it ended
    asked         BIGINT               -- settle: NULL unless late; then what it asked (micro_credits: debited)
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      VARCHAR   PRIMARY KEY,
    tenant_id   VARCHAR   NOT NULL,
    tap         VARCHAR   NOT NULL,
    secret_hash VARCHAR   NOT NULL,    -- orch.keys.hash_secret; the raw key is never stored
    created_at  TIMESTAMP NOT NULL,
    revoked_at  TIMESTAMP,
    priority    VARCHAR,               -- interactive | batch; NULL: the tenant's, else interactive
    rpm         INTEGER,               -- requests per minute of this key; NULL: none
    tpm         INTEGER                -- tokens per minute of this key; NULL: none
);
-- The latest ledger snapshot (orch.snapshot): the ledger's state holding every op of seq < `seq`.
CREATE TABLE IF NOT EXISTS snapshots (
    seq      BIGINT    NOT NULL,
    taken_at TIMESTAMP NOT NULL,
    code     VARCHAR   NOT NULL,  -- orch.snapshot.CODE of the code that wrote it
    state    BLOB      NOT NULL
);
-- What the admin API set for a tenant (PATCH /admin/tenants/{{id}}); NULL: not set (the tap config's, or none).
CREATE TABLE IF NOT EXISTS tenant_policies (
    tenant_id   VARCHAR   PRIMARY KEY,
    priority    VARCHAR,
    weight      DOUBLE,
    rpm         INTEGER,
    tpm         INTEGER,
    updated_at  TIMESTAMP NOT NULL
);
-- Usage rows as written (read them through the `usage` view). Our own request ids ("chatcmpl-" and 32 hex
-- digits) are a kind and a UUID, any other id is text; an X-Request-Id in canonical UUID form is a UUID, any
-- other is text. Random ids as text cost a third of each insert (string compression at checkpoints).
CREATE TABLE IF NOT EXISTS usage_log (
    request_kind      request_kind,           -- with request_uuid: our own request id
    request_uuid      UUID,
    request_text      VARCHAR,                -- else the request id as is
    ts                TIMESTAMP    NOT NULL,  -- when the request arrived (UTC)
    tenant_id         VARCHAR      NOT NULL,
    key_id            VARCHAR,
    tap               VARCHAR      NOT NULL,
    model             VARCHAR      NOT NULL,
    prompt_tokens     INTEGER      NOT NULL,
    completion_tokens INTEGER      NOT NULL,
    cost_micro        BIGINT       NOT NULL,  -- equals the request's settled debit
    ttft_ms           INTEGER,                -- NULL when no token was produced
    latency_ms        INTEGER      NOT NULL,
    status            usage_status NOT NULL,
    finish_reason     VARCHAR,                -- stop, length, abort, ... as the engine said
    end_user          VARCHAR,                -- the request's `user`
    http_uuid         UUID,                   -- X-Request-Id (the client's or Serve's), when a canonical UUID
    http_text         VARCHAR                 -- else as is
);
"""

# version → the statements that bring a file of that version to the next one.
MIGRATIONS = {
    1: "ALTER TABLE ops ADD COLUMN asked BIGINT; UPDATE schema_version SET version = 2;",
    2: "ALTER TABLE usage ADD COLUMN IF NOT EXISTS end_user VARCHAR; "
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS http_request_id VARCHAR; UPDATE schema_version SET version = 3;",
    3: "ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS priority VARCHAR; "
    "ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rpm INTEGER; "
    "ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS tpm INTEGER; UPDATE schema_version SET version = 4;",
    4: f"""
    INSERT INTO usage_log SELECT
        CASE WHEN ours THEN split_part(request_id, '-', 1)::request_kind END,
        CASE WHEN ours THEN right(request_id, 32)::UUID END,
        CASE WHEN NOT ours THEN request_id END,
        ts, tenant_id, key_id, tap, model, prompt_tokens, completion_tokens, cost_micro, ttft_ms, latency_ms,
        status, finish_reason, end_user,
        CASE WHEN canonical THEN http_request_id::UUID END, CASE WHEN NOT canonical THEN http_request_id END
    FROM (SELECT *, regexp_full_match(request_id, '{OUR_ID}') AS ours,
                 coalesce(TRY_CAST(http_request_id AS UUID)::VARCHAR = http_request_id, false) AS canonical
          FROM usage);
    DROP TABLE usage;
    ALTER TABLE ops ALTER kind TYPE op_kind_v5;
    DROP TYPE IF EXISTS op_kind;
    UPDATE schema_version SET version = 5;
    """,
}

VIEWS = """
CREATE OR REPLACE VIEW tenants AS
    SELECT tenant_id, name, applied_at AS created_at FROM ops WHERE kind = 'create_tenant';
CREATE OR REPLACE VIEW grants AS
    SELECT op_id AS grant_id, tenant_id, micro_credits, applied_at AS granted_at, expires_at
    FROM ops WHERE kind = 'grant';
CREATE OR REPLACE VIEW debits AS
    SELECT op_id AS debit_id, hold_id, tenant_id, micro_credits, applied_at AS settled_at
    FROM ops WHERE kind = 'settle';
CREATE OR REPLACE VIEW hold_ends AS
    SELECT hold_id,
           CASE WHEN kind = 'release' THEN 'released' WHEN asked IS NULL THEN 'settled' ELSE 'settled_late' END
           AS state,
           applied_at AS ended_at
    FROM ops WHERE kind IN ('settle', 'release')
    UNION ALL
    SELECT unnest(hold_ids), 'expired', applied_at FROM ops WHERE kind = 'expire_holds';
-- A late settle ends a hold a second time (after its expiry): the last end is its state.
CREATE OR REPLACE VIEW holds AS
    SELECT h.op_id AS hold_id, h.tenant_id, h.micro_credits, h.applied_at AS created_at, h.expires_at,
           coalesce(e.state, 'open') AS state, e.ended_at
    FROM ops h
    LEFT JOIN (SELECT hold_id, arg_max(state, ended_at) AS state, max(ended_at) AS ended_at
               FROM hold_ends GROUP BY hold_id) e ON e.hold_id = h.op_id
    WHERE h.kind = 'hold';
CREATE OR REPLACE VIEW usage AS
    SELECT coalesce(request_text, request_kind::VARCHAR || '-' || replace(request_uuid::VARCHAR, '-', ''))
           AS request_id,
           ts, tenant_id, key_id, tap, model, prompt_tokens, completion_tokens, cost_micro, ttft_ms, latency_ms,
           status, finish_reason, end_user, coalesce(http_text, http_uuid::VARCHAR) AS http_request_id
    FROM usage_log;
"""

# Naive Arrow timestamps: pyarrow converts aware datetimes to UTC for them 9x faster than for tz="UTC",
# and DuckDB reads them as TIMESTAMP (UTC by convention here) instead of a local-time TIMESTAMPTZ.
TS = pa.timestamp("us")
OPS_ARROW = pa.schema(
    [
        ("seq", pa.int64()),
        ("op_id", pa.string()),
        ("kind", pa.string()),
        ("applied_at", TS),
        ("tenant_id", pa.string()),
        ("hold_id", pa.string()),
        ("name", pa.string()),
        ("micro_credits", pa.int64()),
        ("timeout_s", pa.int32()),
        ("released", pa.int64()),
        ("expires_at", TS),
        ("hold_ids", pa.list_(pa.string())),
        ("asked", pa.int64()),
    ]
)
USAGE_ARROW = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", TS),
        ("tenant_id", pa.string()),
        ("key_id", pa.string()),
        ("tap", pa.string()),
        ("model", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("cost_micro", pa.int64()),
        ("ttft_ms", pa.int32()),
        ("latency_ms", pa.int32()),
        ("status", pa.string()),
        ("finish_reason", pa.string()),
        ("end_user", pa.string()),
        ("http_request_id", pa.string()),
    ]
)

# What orch.usage_log.to_arrow makes of usage rows and Store.commit inserts: ``usage_log``'s columns.
USAGE_LOG_ARROW = pa.schema(
    [
        ("request_kind", pa.string()),
        ("request_uuid", pa.uuid()),
        ("request_text", pa.string()),
        *(f for f in USAGE_ARROW if f.name not in ("request_id", "http_request_id")),
        ("http_uuid", pa.uuid()),
        ("http_text", pa.string()),
    ]
)

# The usage export's schema (``llama-orch usage export``, ``GET /admin/usage/export``): the usage table's
# columns, with ``ts`` marked UTC. Stable: columns are only ever added at the end.
USAGE_EXPORT_ARROW = USAGE_ARROW.set(1, pa.field("ts", pa.timestamp("us", tz="UTC")))
