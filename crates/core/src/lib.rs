//! Aether's core types, shared by every layer above: positions in the change log
//! ([`lsn`]), the row changes it carries ([`changes`]), who acts ([`principal`]),
//! and how tasks are started ([`task`]). Nothing here knows PostgreSQL's wire
//! protocol, a socket or a table name.

pub mod changes;
pub mod lsn;
pub mod principal;
pub mod task;
