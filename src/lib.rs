//! Aether: PostgreSQL logical replication to WebSocket subscribers.
//!
//! Data flows one way: [`replication`] (slot, pgoutput, LSNs) → [`changes`] (typed
//! events) → [`router`] (subscription index, authorization, resume history) →
//! [`realtime`] (sessions and protocol) → socket. [`api`] serves HTTP beside it (on
//! the [`http`] edge: accept loop, connection caps and timeouts) and
//! writes only to PostgreSQL; [`store`] owns the database (embedded cluster, pool,
//! migrations). [`auth`] and [`storage`] are the cores behind the auth and file
//! routes (users and sessions; buckets, folders, files and their bytes).

pub mod api;
pub mod auth;
pub mod changelog;
pub mod changes;
pub mod config;
pub mod http;
pub mod logging;
pub mod realtime;
pub mod replication;
pub mod router;
pub mod server;
pub mod storage;
pub mod store;
