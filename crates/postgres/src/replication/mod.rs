//! The source: a logical replication slot read over the streaming protocol.

pub mod conn;
pub mod pgoutput;
