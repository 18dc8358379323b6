//! Aether: PostgreSQL logical replication to WebSocket subscribers.
//!
//! Data flows one way, and the crates enforce it: `aether_core` (positions, row
//! changes, principals) ← `aether_postgres` (replication client, decoder, embedded
//! cluster, migrations) ← `aether_changelog` (the durable log and the replication
//! task that fills it) ← `aether_router` (subscription index, authorization
//! policy, hot tail; it knows no table name) ← `aether_realtime` (the
//! connection engine and its dialects) → socket; this crate wires them:
//! [`rules`] (the application's table rules, plugged into the router as a
//! policy and taps, and presence for the realtime side).
//! [`api`] serves HTTP beside it (on the [`http`] edge: accept loop, connection
//! caps and timeouts) and writes only to PostgreSQL. [`auth`] and [`storage`] are
//! the cores behind the auth and file routes (users and sessions; buckets,
//! folders, files and their bytes).

pub(crate) mod api;
pub use aether_auth as auth;
pub(crate) mod cluster;
pub mod config;
pub mod http;
pub mod logging;

pub(crate) mod rules;
pub mod server;
pub use aether_storage as storage;
