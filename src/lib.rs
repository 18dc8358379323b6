//! Aether: PostgreSQL logical replication to WebSocket subscribers.
//!
//! Data flows one way, and the crates enforce it: `aether_core` (positions, row
//! changes, principals) ← `aether_postgres` (replication client, decoder, embedded
//! cluster, migrations) ← `aether_changelog` (the durable log and the replication
//! task that fills it) ← `aether_router` (subscription index, authorization
//! policy, hot tail; it knows no table name) ← `aether_realtime` (the
//! connection engine and its dialects) → socket. Beside the realtime side,
//! `aether_auth` and `aether_storage` (the cores behind the auth and file
//! routes) ← `aether_http` (the HTTP edge, the native routes and the Supabase
//! facade; it writes only to PostgreSQL).
//!
//! This crate is the binary: [`config`], the [`runtime`], the wiring and
//! supervision ([`server`]), cluster mode, and [`rules`], the application's own table
//! rules, plugged into the router as a policy and taps and into the realtime
//! side as presence and channel policies.

pub(crate) mod cluster;
pub mod config;
pub mod logging;
pub(crate) mod rules;
pub mod runtime;
pub mod server;
