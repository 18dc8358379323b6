//! The fallback: policies we cannot compile, evaluated by PostgreSQL over the
//! decoded row values, for every candidate subscriber of a change in one call
//! (`aether.rls_visible`, migrations/0014), off the router task. The router
//! holds back only the connections waiting for an answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aether_core::changes::{ChangeKind, RowChange};
use aether_core::lsn::Position;
use aether_core::principal::Principal;
use aether_router::policy::{Decision, PolicyWaker};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One connection waiting to know whether it may see one change.
pub(crate) struct Request {
    pub connection: u64,
    /// The connection's epoch when asked (see [`Epochs`]).
    pub epoch: u64,
    pub principal: Arc<Principal>,
    pub change: Arc<RowChange>,
    /// The rule's SQL and the table's name (its alias in that SQL).
    pub sql: Arc<str>,
    pub alias: Arc<str>,
    /// The rule's own function ([`make_function`]), if it could be made.
    pub function: Option<Arc<str>>,
}

/// Makes (or replaces) `aether.rls_<table oid>_<role>`: the rule's SQL in a
/// PL/pgSQL function of its own, static, so each connection plans it once
/// instead of once per subscriber, and the row is decoded into the table's
/// type once per change. Viewers are judged together; only when one of them
/// raises are they judged again one by one, each in a subtransaction of its
/// own, so the error stays theirs. Returns the function's quoted name.
pub(crate) async fn make_function(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    oid: u32,
    role: &str,
    sql: &str,
) -> Result<Arc<str>, String> {
    let name = format!("aether.\"rls_{oid}_{role}\"");
    let tag = "$aether_rls$";
    if sql.contains(tag) {
        return Err("the policy text holds the function's quote tag".into());
    }
    let tbl = format!("{}.{}", quote(schema), quote(table));
    let alias = quote(table);
    let body = format!(
        r#"CREATE OR REPLACE FUNCTION {name}(aether_rows text[], aether_roles text[], aether_claims text[])
RETURNS text[] LANGUAGE plpgsql SET search_path = pg_catalog AS {tag}
#variable_conflict use_column
DECLARE
    aether_out text[] := '{{}}';
    aether_recs {tbl}[] := '{{}}';
    aether_rec {tbl};
    aether_seen boolean;
    aether_v int;
    aether_r int;
    aether_n int := coalesce(array_length(aether_rows, 1), 0);
BEGIN
    FOR aether_r IN 1 .. aether_n LOOP
        aether_recs[aether_r] := jsonb_populate_record(NULL::{tbl}, aether_rows[aether_r]::jsonb);
    END LOOP;
    BEGIN
        FOR aether_v IN 1 .. coalesce(array_length(aether_claims, 1), 0) LOOP
            PERFORM set_config('request.jwt.claims', aether_claims[aether_v], true),
                    set_config('request.jwt.claim.sub', coalesce(aether_claims[aether_v]::jsonb ->> 'sub', ''), true),
                    set_config('request.jwt.claim.role', aether_roles[aether_v], true),
                    set_config('role', aether_roles[aether_v], true);
            FOR aether_r IN 1 .. aether_n LOOP
                aether_rec := aether_recs[aether_r];
                SELECT EXISTS (SELECT 1 FROM (SELECT (aether_rec).*) AS {alias} WHERE {sql})
                  INTO aether_seen;
                aether_out := aether_out || CASE WHEN aether_seen THEN 't' ELSE 'f' END;
            END LOOP;
            RESET ROLE;
        END LOOP;
        RETURN aether_out;
    EXCEPTION WHEN OTHERS THEN
        aether_out := '{{}}';
    END;
    FOR aether_v IN 1 .. coalesce(array_length(aether_claims, 1), 0) LOOP
        FOR aether_r IN 1 .. aether_n LOOP
            BEGIN
                PERFORM set_config('request.jwt.claims', aether_claims[aether_v], true),
                        set_config('request.jwt.claim.sub', coalesce(aether_claims[aether_v]::jsonb ->> 'sub', ''), true),
                        set_config('request.jwt.claim.role', aether_roles[aether_v], true),
                        set_config('role', aether_roles[aether_v], true);
                aether_rec := aether_recs[aether_r];
                SELECT EXISTS (SELECT 1 FROM (SELECT (aether_rec).*) AS {alias} WHERE {sql})
                  INTO aether_seen;
                RESET ROLE;
                aether_out := aether_out || CASE WHEN aether_seen THEN 't' ELSE 'f' END;
            EXCEPTION WHEN OTHERS THEN
                aether_out := aether_out || ('e' || SQLERRM);
            END;
        END LOOP;
    END LOOP;
    RETURN aether_out;
END
{tag};
REVOKE ALL ON FUNCTION {name}(text[], text[], text[]) FROM PUBLIC;"#
    );
    client
        .batch_execute(&body)
        .await
        .map_err(|e| format!("making {name}: {e}"))?;
    Ok(Arc::from(name))
}

/// Answers, one per connection, for the change it waits at, with the epoch
/// it was asked in.
pub(crate) type Answers = Arc<std::sync::Mutex<HashMap<u64, (Position, u64, Decision)>>>;

/// Each connection's current epoch; none once it is forgotten (closed, or
/// acting as another principal): answers of another epoch are dropped.
pub(crate) type Epochs = Arc<std::sync::Mutex<HashMap<u64, u64>>>;

/// Records an answer if its connection is still in the epoch it asked in.
pub(super) fn answer(epochs: &Epochs, answers: &Answers, r: &Request, d: Decision) {
    let Ok(e) = epochs.lock() else { return };
    if e.get(&r.connection) != Some(&r.epoch) {
        return;
    }
    if let Ok(mut a) = answers.lock() {
        a.insert(r.connection, (r.change.position, r.epoch, d));
    }
}

/// Runs until shutdown: each batch is grouped by change, one call per change.
pub(crate) async fn evaluate(
    pool: deadpool_postgres::Pool,
    mut requests: mpsc::UnboundedReceiver<Vec<Request>>,
    epochs: Epochs,
    answers: Answers,
    waker: Arc<std::sync::OnceLock<PolicyWaker>>,
    shutdown: CancellationToken,
) {
    loop {
        let mut batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            b = requests.recv() => match b {
                Some(b) => b,
                None => return,
            },
        };
        while let Ok(more) = requests.try_recv() {
            batch.extend(more);
        }
        // Change by change (and rule, which a reload may have replaced).
        let mut groups: HashMap<(Position, Arc<str>), Vec<Request>> = HashMap::new();
        for r in batch {
            groups
                .entry((r.change.position, Arc::clone(&r.sql)))
                .or_default()
                .push(r);
        }
        let mut backoff = Duration::from_millis(100);
        let mut pending: Vec<Vec<Request>> = groups.into_values().collect();
        while !pending.is_empty() {
            let client = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                c = pool.get() => c,
            };
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "row security: no database connection; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let calls = pending.iter().map(|g| judge(&client, g));
            // Pipelined on one connection: one round trip for the batch.
            let results = futures_util::future::join_all(calls).await;
            let mut again = Vec::new();
            let mut woken = Vec::new();
            for (group, result) in pending.into_iter().zip(results) {
                if !matches!(&result, Err(e) if transient(e)) {
                    woken.extend(group.iter().map(|r| r.connection));
                }
                match result {
                    Ok(decisions) => {
                        for (r, d) in group.iter().zip(decisions) {
                            answer(&epochs, &answers, r, d);
                        }
                    }
                    Err(e) if transient(&e) => again.push(group),
                    Err(e) => {
                        // This rule cannot be asked: its subscribers see
                        // nothing of this change; everyone else goes on.
                        tracing::error!(error = %e, table = %group[0].change.relation.qualified,
                            "row security: evaluating a policy in PostgreSQL failed");
                        metrics::counter!("aether_policy_errors_total")
                            .increment(group.len() as u64);
                        for r in &group {
                            answer(&epochs, &answers, r, Decision::Deny);
                        }
                    }
                }
            }
            if let Some(w) = waker.get() {
                for c in woken {
                    w.wake(c);
                }
            }
            if !again.is_empty() {
                tracing::warn!("row security: the database connection failed; asking again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            pending = again;
        }
    }
}

/// A connection or server failure: asked again, nothing decided.
fn transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(c) => c.code().starts_with("08") || c.code().starts_with("57P"),
    }
}

/// One call for the subscribers of one change.
async fn judge(
    client: &deadpool_postgres::Client,
    group: &[Request],
) -> Result<Vec<Decision>, tokio_postgres::Error> {
    let first = &group[0];
    let change = &first.change;
    let row = |r: &aether_core::changes::Row| {
        serde_json::to_string(&AllColumns {
            relation: &change.relation,
            values: r,
        })
        .unwrap_or_else(|_| "{}".into())
    };
    // The new row, and the old one when it is whole (to see a row leave).
    let whole_old = change.kind == ChangeKind::Update
        && change
            .old
            .as_ref()
            .is_some_and(|o| o.iter().all(Option::is_some));
    let mut rows = Vec::new();
    match change.kind {
        ChangeKind::Insert | ChangeKind::Update => {
            rows.extend(change.new.as_ref().map(row));
            if whole_old {
                rows.extend(change.old.as_ref().map(row));
            }
        }
        ChangeKind::Delete => rows.extend(change.old.as_ref().map(row)),
        ChangeKind::Truncate => {}
    }
    // Viewers with the same claims are asked once.
    let mut viewers: Vec<(&'static str, String)> = Vec::new();
    let mut index: HashMap<(&'static str, String), usize> = HashMap::new();
    let mut of: Vec<usize> = Vec::with_capacity(group.len());
    for r in group {
        let v = (r.principal.role.database_role(), r.principal.jwt_claims());
        let i = *index.entry(v.clone()).or_insert_with(|| {
            viewers.push(v);
            viewers.len() - 1
        });
        of.push(i);
    }
    let roles: Vec<&str> = viewers.iter().map(|v| v.0).collect();
    let claim_sets: Vec<&str> = viewers.iter().map(|v| v.1.as_str()).collect();
    let rel = &change.relation;
    let table = format!("{}.{}", quote(&rel.schema), quote(&rel.name));
    let out: Vec<String> = match &first.function {
        Some(f) => client
            .query_one(
                &format!("SELECT {f}($1, $2, $3)"),
                &[&rows, &roles, &claim_sets],
            )
            .await?
            .get(0),
        None => client
            .query_one(
                "SELECT aether.rls_visible($1::text::regclass, $2, $3, $4, $5, $6)",
                &[
                    &table,
                    &&*first.alias,
                    &&*first.sql,
                    &rows,
                    &roles,
                    &claim_sets,
                ],
            )
            .await?
            .get(0),
    };
    let n = rows.len();
    let seen = |viewer: usize, row: usize| -> Option<bool> {
        match out.get(viewer * n + row).map(String::as_str) {
            Some("t") => Some(true),
            Some("f") => Some(false),
            Some(e) => {
                tracing::warn!(table = %rel.qualified, error = e.trim_start_matches('e'),
                    "row security: a policy failed for one subscriber; they do not see this change");
                metrics::counter!("aether_policy_errors_total").increment(1);
                None
            }
            None => None,
        }
    };
    Ok(of
        .iter()
        .map(|&v| match change.kind {
            ChangeKind::Insert => decision(seen(v, 0), None),
            ChangeKind::Delete => decision(seen(v, 0), None),
            ChangeKind::Update => {
                decision(seen(v, 0), if whole_old { Some(seen(v, 1)) } else { None })
            }
            ChangeKind::Truncate => Decision::Allow,
        })
        .collect())
}

/// From whether the viewer sees the new (or deleted) row, and, for an UPDATE
/// whose old row is whole, the old one. An error counts as not seeing it.
pub(crate) fn decision(now: Option<bool>, before: Option<Option<bool>>) -> Decision {
    let now = now == Some(true);
    match before {
        None => {
            if now {
                Decision::Allow
            } else {
                Decision::Deny
            }
        }
        Some(before) => match (before == Some(true), now) {
            (true, true) => Decision::Allow,
            (false, true) => Decision::Enter,
            (true, false) => Decision::Leave,
            (false, false) => Decision::Deny,
        },
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A row as a JSON object with every column it holds, secret ones included:
/// a policy may read them; only a yes or no comes back.
struct AllColumns<'a> {
    relation: &'a aether_core::changes::Relation,
    values: &'a [Option<serde_json::Value>],
}

impl serde::Serialize for AllColumns<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (col, v) in self.relation.columns.iter().zip(self.values) {
            if let Some(v) = v {
                map.serialize_entry(&col.name, v)?;
            }
        }
        map.end()
    }
}
