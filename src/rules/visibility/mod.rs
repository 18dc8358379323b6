//! Who may see a row, decided in-process from the decoded row wherever the
//! rules allow it: no query per subscriber per change.
//!
//! - Aether's own tables (files, buckets, auth events, …) follow the
//!   [`conventions`], which state Aether's own policies; a storage table
//!   (buckets, files, folders) a DBA adds a policy to is decided as below
//!   ([`catalog::overridden`]).
//! - Every other published table follows what PostgreSQL says a SELECT by
//!   the viewer would return: its grants and its RLS policies
//!   ([`catalog`]). Policies of the common shapes are compiled ([`expr`],
//!   membership through another table kept in [`members`]); the rest are
//!   evaluated by PostgreSQL over the decoded row, for all the change's
//!   candidate subscribers in one call ([`postgres`]).
//! - `service_role` sees every row (it bypasses RLS, as on Supabase).
//!
//! INSERT is judged on the new row, DELETE on the old one. An UPDATE whose
//! old row is whole (`REPLICA IDENTITY FULL`) is judged on both: a row that
//! comes into sight is sent as an INSERT, one that leaves it as a DELETE. A
//! DELETE whose old row is only its key goes, as that key, to every viewer
//! the policies let read the table at all.

pub(crate) mod catalog;
pub(crate) mod conventions;
pub(crate) mod expr;
pub(crate) mod members;
pub(crate) mod postgres;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use aether_core::changes::{ChangeKind, Row, RowChange};
use aether_core::lsn::Position;
use aether_core::principal::{Principal, Role};
use aether_router::policy::{Decision, Policy, PolicyWaker, Viewer};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use catalog::{Access, Catalog, Report, Rule};
use conventions::TableRules;
use members::Membership;

/// Bytes one membership index may hold.
pub(crate) const MEMBERSHIP_BYTES: usize = 64 << 20;
/// Bytes of member-table changes kept while a new snapshot loads.
const BUFFER_BYTES: usize = 16 << 20;

/// Aether's own tables: the [`conventions`] decide for them.
use aether_postgres::store::migrate::is_own_table as is_own;

/// The published tables' rules and membership indexes, as loaded together.
pub(crate) struct Install {
    catalog: Catalog,
    members: Vec<Result<Membership, String>>,
}

/// How one table is decided, per role, for `/ws/status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct TableReport {
    pub anon: Report,
    pub authenticated: Report,
}

/// What the policy on the router task and the tasks beside it share.
pub(crate) struct Shared {
    /// Bumped when a new [`Install`] is in `next`.
    generation: AtomicU64,
    next: Mutex<Option<Install>>,
    /// A snapshot of these tables is being read: the router keeps their
    /// changes until it is installed.
    buffering: AtomicBool,
    buffer_tables: RwLock<HashSet<String>>,
    /// Load again at the next tick, whatever the fingerprint says.
    reload: AtomicBool,
    status: RwLock<BTreeMap<String, TableReport>>,
    /// Connections held back for a table the rules did not cover yet: woken
    /// when new rules are ready, so the router installs them and asks again.
    held: Mutex<HashSet<u64>>,
    /// Each connection's current epoch: bumped (removed) when it is
    /// forgotten, so a late answer for its old principal is dropped.
    epochs: postgres::Epochs,
    answers: postgres::Answers,
    waker: Arc<OnceLock<PolicyWaker>>,
}

impl Shared {
    /// How each published table is decided, for `/ws/status`.
    pub(crate) fn status(&self) -> BTreeMap<String, TableReport> {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }
}

impl aether_http::RowSecurityReport for Shared {
    fn report(&self) -> BTreeMap<String, serde_json::Value> {
        self.status()
            .into_iter()
            .map(|(table, r)| {
                let r = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
                (table, r)
            })
            .collect()
    }
}

/// The router's [`Policy`].
pub(crate) struct RowSecurity {
    conventions: TableRules,
    shared: Arc<Shared>,
    generation: u64,
    catalog: Catalog,
    members: Vec<Result<Membership, String>>,
    /// Member-table changes seen since a snapshot began loading.
    buffer: Vec<Arc<RowChange>>,
    buffer_bytes: usize,
    /// Decisions for PostgreSQL, sent at [`Policy::settle`].
    batch: Vec<postgres::Request>,
    /// Connections with a question out, and the change it is about.
    asked: HashMap<u64, Position>,
    /// The last epoch handed to a connection (see `Shared::epochs`).
    next_epoch: u64,
    /// Tables the rules did not cover, and the generation a reload was asked
    /// at: asked once per generation, not once per change.
    missing: HashMap<String, u64>,
    /// The generation a reload was last asked at.
    requested: Option<u64>,
    requests: mpsc::UnboundedSender<Vec<postgres::Request>>,
}

impl RowSecurity {
    /// A policy with no rules yet, and the receiver of its requests to
    /// PostgreSQL.
    fn empty(
        public_buckets: HashSet<String>,
    ) -> (RowSecurity, mpsc::UnboundedReceiver<Vec<postgres::Request>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            next: Mutex::new(None),
            buffering: AtomicBool::new(false),
            buffer_tables: RwLock::new(HashSet::new()),
            reload: AtomicBool::new(false),
            status: RwLock::new(BTreeMap::new()),
            held: Mutex::new(HashSet::new()),
            epochs: Arc::default(),
            answers: Arc::default(),
            waker: Arc::default(),
        });
        let policy = RowSecurity {
            conventions: TableRules::new(public_buckets),
            shared: Arc::clone(&shared),
            generation: 0,
            catalog: Catalog::default(),
            members: Vec::new(),
            buffer: Vec::new(),
            buffer_bytes: 0,
            batch: Vec::new(),
            asked: HashMap::new(),
            next_epoch: 0,
            missing: HashMap::new(),
            requested: None,
            requests: tx,
        };
        (policy, rx)
    }
}

/// Starts the policy with the rules loaded now, and the tasks that keep them
/// current and evaluate in PostgreSQL what does not compile.
pub(crate) async fn start(
    pool: deadpool_postgres::Pool,
    publication: String,
    public_buckets: HashSet<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<(RowSecurity, Arc<Shared>, Vec<(&'static str, BoxedTask)>)> {
    let mut client = pool.get().await?;
    let fingerprint = fingerprint(&client, &publication).await?;
    let install = load(&mut client, &publication, None).await?;
    drop(client);
    let (mut policy, rx) = RowSecurity::empty(public_buckets);
    let shared = Arc::clone(&policy.shared);
    policy.install(install);
    let tasks: Vec<(&'static str, BoxedTask)> = vec![
        (
            "row-security-catalog",
            Box::pin(follow(
                pool.clone(),
                publication,
                Arc::clone(&shared),
                fingerprint,
                shutdown.clone(),
            )),
        ),
        (
            "row-security-postgres",
            Box::pin(postgres::evaluate(
                pool,
                rx,
                Arc::clone(&shared.epochs),
                Arc::clone(&shared.answers),
                Arc::clone(&shared.waker),
                shutdown,
            )),
        ),
    ];
    Ok((policy, shared, tasks))
}

pub(crate) type BoxedTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Reads the rules and, for the membership indexes they need, the member
/// tables. With `shared`, the router keeps those tables' changes from before
/// the snapshot on, to replay onto it when it is installed.
async fn load(
    client: &mut deadpool_postgres::Client,
    publication: &str,
    shared: Option<&Shared>,
) -> Result<Install, tokio_postgres::Error> {
    let mut catalog = catalog::load(client, publication, is_own).await?;
    // Rules PostgreSQL evaluates get a function of their own.
    for (key, t) in catalog.tables.iter_mut() {
        let Some((schema, _)) = key.split_once('.') else {
            continue;
        };
        for (role, access) in [
            ("anon", &mut t.anon),
            ("authenticated", &mut t.authenticated),
        ] {
            if let Access::Rule(rule) = access
                && rule.compiled.is_err()
            {
                match postgres::make_function(client, schema, &t.name, t.oid, role, &rule.sql).await
                {
                    Ok(f) => rule.function = Some(f),
                    Err(e) => tracing::warn!(error = %e,
                        "row security: evaluating this rule with the generic function instead"),
                }
            }
        }
    }
    if let Some(shared) = shared
        && !catalog.members.is_empty()
    {
        if let Ok(mut t) = shared.buffer_tables.write() {
            *t = catalog
                .members
                .iter()
                .map(|m| m.spec.table.clone())
                .collect();
        }
        shared.buffering.store(true, Ordering::SeqCst);
    }
    let mut members = Vec::new();
    for m in &catalog.members {
        members.push(Membership::snapshot(client, m.clone(), MEMBERSHIP_BYTES).await);
    }
    Ok(Install { catalog, members })
}

/// What, if changed, means the rules must be read again: policies, RLS
/// switches, grants, columns and the publication's tables.
async fn fingerprint(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT md5(
                coalesce((SELECT string_agg(schemaname || '.' || tablename || ':' || policyname || ':'
                                 || permissive || roles::text || cmd || coalesce(qual, ''), ','
                                 ORDER BY schemaname, tablename, policyname)
                            FROM pg_policies), '')
             || coalesce((SELECT string_agg(c.oid::text || c.relrowsecurity::text
                                 || coalesce(c.relacl::text, '')
                                 || (SELECT coalesce(string_agg(a.attname || a.atttypid::text
                                                 || coalesce(a.attacl::text, ''), ',' ORDER BY a.attnum), '')
                                       FROM pg_attribute a
                                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
                                 || coalesce((SELECT string_agg(i.indkey::text, ',') FROM pg_index i
                                               WHERE i.indrelid = c.oid AND i.indisprimary), ''),
                                 ',' ORDER BY c.oid)
                            FROM pg_publication_tables pt
                            JOIN pg_namespace n ON n.nspname = pt.schemaname
                            JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                           WHERE pt.pubname = $1), ''))",
            &[&publication],
        )
        .await?;
    Ok(row.get(0))
}

/// Reads the rules again within a second of a change to them.
async fn follow(
    pool: deadpool_postgres::Pool,
    publication: String,
    shared: Arc<Shared>,
    mut last: String,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The previous load is not installed yet (no change routed since).
        if shared.next.lock().map(|n| n.is_some()).unwrap_or(true) {
            continue;
        }
        let Ok(mut client) = pool.get().await else {
            continue;
        };
        let now = match fingerprint(&client, &publication).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "row security: reading the policies' fingerprint");
                continue;
            }
        };
        if now == last && !shared.reload.swap(false, Ordering::SeqCst) {
            continue;
        }
        match load(&mut client, &publication, Some(&shared)).await {
            Ok(install) => {
                publish(&install.catalog, &install.members, &shared);
                if let Ok(mut n) = shared.next.lock() {
                    *n = Some(install);
                }
                shared.generation.fetch_add(1, Ordering::SeqCst);
                last = now;
                let held: Vec<u64> = shared
                    .held
                    .lock()
                    .map(|mut h| h.drain().collect())
                    .unwrap_or_default();
                if let Some(w) = shared.waker.get() {
                    for c in held {
                        w.wake(c);
                    }
                }
                tracing::info!("row security: policies read again");
            }
            Err(e) => {
                shared.buffering.store(false, Ordering::SeqCst);
                // Asked again at the next tick.
                shared.reload.store(true, Ordering::SeqCst);
                tracing::warn!(error = %e, "row security: reading the policies");
            }
        }
    }
}

/// Says in `/ws/status` how each table is decided.
fn publish(catalog: &Catalog, members: &[Result<Membership, String>], shared: &Shared) {
    let report = |a: &Access| match a {
        Access::Rule(Rule {
            compiled: Ok(_),
            members: used,
            ..
        }) => match used.iter().find_map(|i| members.get(*i)?.as_ref().err()) {
            Some(e) => Report {
                decided: "in_postgres",
                why: Some(e.clone()),
            },
            None => a.report(),
        },
        a => a.report(),
    };
    let status = catalog
        .tables
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                TableReport {
                    anon: report(&t.anon),
                    authenticated: report(&t.authenticated),
                },
            )
        })
        .collect();
    if let Ok(mut s) = shared.status.write() {
        *s = status;
    }
}

/// One viewer's memberships, as a compiled rule reads them.
struct Viewing<'a> {
    members: &'a [Result<Membership, String>],
    uid: Option<&'a str>,
}

impl expr::Memberships for Viewing<'_> {
    fn contains(&self, spec: usize, key: &str) -> bool {
        match (self.members.get(spec), self.uid) {
            (Some(Ok(m)), Some(u)) => m.contains(u, key),
            _ => false,
        }
    }

    fn rows(&self, spec: usize) -> (bool, bool) {
        match (self.members.get(spec), self.uid) {
            (Some(Ok(m)), Some(u)) => m.rows(u),
            _ => (false, false),
        }
    }
}

/// Is the row only its key (columns the server did not send)?
fn partial(row: &Row) -> bool {
    row.iter().any(Option::is_none)
}

impl RowSecurity {
    fn install(&mut self, install: Install) {
        let Install {
            catalog,
            mut members,
        } = install;
        for m in members.iter_mut() {
            let failed = match m {
                Ok(index) => self.buffer.iter().find_map(|c| index.apply(c).err()),
                Err(_) => None,
            };
            if let Some(e) = failed {
                *m = Err(e);
            }
        }
        if self.buffer_bytes > BUFFER_BYTES {
            for m in members.iter_mut() {
                *m = Err("member-table changes outpaced reading it; reading it again".into());
            }
            self.shared.reload.store(true, Ordering::SeqCst);
        }
        self.buffer.clear();
        self.buffer_bytes = 0;
        self.catalog = catalog;
        self.members = members;
        for e in self.members.iter().filter_map(|m| m.as_ref().err()) {
            tracing::warn!(error = %e, "row security: a membership index is not kept; its tables are evaluated in PostgreSQL");
        }
        self.publish();
    }

    fn refresh(&mut self) {
        let g = self.shared.generation.load(Ordering::SeqCst);
        if g == self.generation {
            return;
        }
        self.generation = g;
        // Buffering ends as the load is taken, under its lock: the next load
        // (which waits for `next` to be empty) turns it on again for itself.
        let next = self.shared.next.lock().ok().and_then(|mut n| {
            let taken = n.take();
            if taken.is_some() {
                self.shared.buffering.store(false, Ordering::SeqCst);
            }
            taken
        });
        if let Some(install) = next {
            self.install(install);
        }
    }

    fn publish(&self) {
        publish(&self.catalog, &self.members, &self.shared);
    }

    fn in_process(
        &self,
        rule_pred: &expr::Pred,
        principal: &Principal,
        change: &RowChange,
    ) -> Decision {
        let member = Viewing {
            members: &self.members,
            uid: principal.user_id.as_deref(),
        };
        let seen = |row: &Row| {
            rule_pred
                .eval(&expr::Scope {
                    relation: &change.relation,
                    row,
                    principal,
                    member: &member,
                })
                .map(|t| t == Some(true))
        };
        match change.kind {
            ChangeKind::Insert => {
                postgres::decision(change.new.as_ref().map(|r| seen(r).unwrap_or(false)), None)
            }
            // The old row is whole here (a key-only one was decided before):
            // unknown means a column the rule reads is gone, so nothing.
            ChangeKind::Delete => match change.old.as_ref().map(seen) {
                Some(Ok(true)) => Decision::Allow,
                _ => Decision::Deny,
            },
            ChangeKind::Update => {
                let now = change.new.as_ref().map(|r| seen(r).unwrap_or(false));
                let before = match change.old.as_ref().map(seen) {
                    Some(Ok(b)) => Some(Some(b)),
                    // A column the rule reads is gone: the old row is not
                    // shown (the change comes, if at all, as an INSERT).
                    Some(Err(expr::Stop::Failed)) => Some(Some(false)),
                    _ => None,
                };
                postgres::decision(now, before)
            }
            ChangeKind::Truncate => Decision::Allow,
        }
    }

    fn in_postgres(
        &mut self,
        viewer: Viewer<'_>,
        change: &Arc<RowChange>,
        sql: Arc<str>,
        alias: Arc<str>,
        function: Option<Arc<str>>,
    ) -> Decision {
        let c = viewer.connection;
        // Answers count only for this connection as it is now: one asked
        // before a token renewal (a `forget`) has another epoch.
        let epoch = match self.shared.epochs.lock() {
            Ok(mut e) => *e.entry(c).or_insert_with(|| {
                self.next_epoch += 1;
                self.next_epoch
            }),
            Err(_) => return Decision::Deny,
        };
        if let Some((at, e, d)) = self
            .shared
            .answers
            .lock()
            .ok()
            .and_then(|a| a.get(&c).copied())
            && at == change.position
            && e == epoch
        {
            self.asked.remove(&c);
            return d;
        }
        if self.asked.get(&c) == Some(&change.position) {
            return Decision::Pending;
        }
        // A column the rule may read was not sent (an unchanged TOAST value
        // without REPLICA IDENTITY FULL): PostgreSQL would judge it as NULL,
        // so it is not judged at all, and not shown.
        let unsent = change
            .new
            .as_ref()
            .filter(|_| change.kind != ChangeKind::Delete)
            .is_some_and(|row| {
                row.iter()
                    .zip(&change.relation.columns)
                    .any(|(v, col)| v.is_none() && sql.contains(col.name.as_str()))
            });
        if unsent {
            return Decision::Deny;
        }
        self.asked.insert(c, change.position);
        self.batch.push(postgres::Request {
            connection: c,
            epoch,
            principal: Arc::clone(viewer.principal),
            change: Arc::clone(change),
            sql,
            alias,
            function,
        });
        Decision::Pending
    }
}

impl Policy for RowSecurity {
    fn observe(&mut self, change: &RowChange) {
        self.refresh();
        self.conventions.observe(change);
        let table = &*change.relation.qualified;
        if self.shared.buffering.load(Ordering::SeqCst)
            && self.buffer_bytes <= BUFFER_BYTES
            && self
                .shared
                .buffer_tables
                .read()
                .is_ok_and(|t| t.contains(table))
        {
            self.buffer_bytes += change.approx_bytes();
            self.buffer.push(Arc::new(RowChange {
                position: change.position,
                kind: change.kind,
                relation: Arc::clone(&change.relation),
                new: change.new.clone(),
                old: change.old.clone(),
                commit_time_ms: change.commit_time_ms,
                epoch: change.epoch,
            }));
        }
        let mut failed = false;
        for m in self.members.iter_mut() {
            if let Ok(index) = m
                && index.table() == table
                && let Err(e) = index.apply(change)
            {
                tracing::warn!(error = %e, "row security: a membership index is dropped; its tables are evaluated in PostgreSQL");
                *m = Err(e);
                failed = true;
            }
        }
        if failed {
            self.publish();
        }
    }

    fn decide(&mut self, viewer: Viewer<'_>, change: &Arc<RowChange>) -> Decision {
        self.refresh();
        let principal: &Principal = viewer.principal;
        if principal.is_service() {
            return Decision::Allow;
        }
        let table = &*change.relation.qualified;
        // Aether's own tables follow the conventions unless a DBA's policy
        // reads them, which puts them in the catalog.
        if is_own(table) && !self.catalog.tables.contains_key(table) {
            return self.conventions.decide(viewer, change);
        }
        let Some(t) = self.catalog.tables.get(table) else {
            // Published since the rules were read: read them again, and ask
            // once more when they are.
            // A load under way when the table was published may miss it:
            // two loads after it was first met, it is not published.
            let first = *self
                .missing
                .entry(table.to_owned())
                .or_insert(self.generation);
            if self.generation >= first + 2 {
                return Decision::Deny;
            }
            if self.missing.len() > 10_000 {
                self.missing.clear();
            }
            // Woken by the next load, which the router installs when it asks again.
            if let Ok(mut h) = self.shared.held.lock() {
                h.insert(viewer.connection);
            }
            // Once per generation, not once per change.
            if self.requested != Some(self.generation) {
                self.requested = Some(self.generation);
                self.shared.reload.store(true, Ordering::SeqCst);
            }
            return Decision::Pending;
        };
        let access = match principal.role {
            Role::Anon => &t.anon,
            Role::Authenticated => &t.authenticated,
            Role::Service => return Decision::Allow,
        };
        let rule = match access {
            Access::Nothing(_) => return Decision::Deny,
            Access::Everything => return Decision::Allow,
            Access::Rule(rule) => rule,
        };
        // Only the key of a deleted row: sent to whoever may read the table.
        if change.kind == ChangeKind::Delete && change.old.as_ref().is_none_or(partial) {
            return Decision::Allow;
        }
        let compiled = match &rule.compiled {
            Ok(p)
                if rule
                    .members
                    .iter()
                    .all(|i| matches!(self.members.get(*i), Some(Ok(_)))) =>
            {
                Some(p)
            }
            _ => None,
        };
        match compiled {
            Some(p) => self.in_process(p, principal, change),
            None => {
                let (sql, alias) = (Arc::clone(&rule.sql), Arc::clone(&t.name));
                let function = rule.function.clone();
                self.in_postgres(viewer, change, sql, alias, function)
            }
        }
    }

    fn settle(&mut self) {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            if self.requests.send(batch).is_err() {
                tracing::error!("row security: the PostgreSQL evaluator has stopped");
            }
        }
    }

    fn forget(&mut self, connection: u64) {
        self.asked.remove(&connection);
        // Lock order: epochs, then answers (as the evaluator).
        let epochs = self.shared.epochs.lock();
        if let Ok(mut e) = epochs {
            e.remove(&connection);
        }
        if let Ok(mut h) = self.shared.held.lock() {
            h.remove(&connection);
        }
        if let Ok(mut a) = self.shared.answers.lock() {
            a.remove(&connection);
        }
    }

    fn attach(&mut self, waker: PolicyWaker) {
        let _ = self.shared.waker.set(waker);
    }

    fn index_key(&mut self, principal: &Principal, table: &str) -> Option<(String, String)> {
        self.refresh();
        let uid = principal.user_id.as_ref()?;
        if principal.role != Role::Authenticated || is_own(table) {
            return None;
        }
        let Access::Rule(rule) = &self.catalog.tables.get(table)?.authenticated else {
            return None;
        };
        let pred = rule.compiled.as_ref().ok()?;
        Some((pred.uid_column()?.to_owned(), uid.clone()))
    }

    fn index_generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests;
