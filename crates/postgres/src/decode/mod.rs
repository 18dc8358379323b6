//! Typed change events, built from decoded pgoutput messages.
//!
//! The replication task hands raw [`LogicalMessage`](crate::replication::pgoutput::LogicalMessage)s
//! to the [`Assembler`], which checks transaction framing, resolves relations, converts
//! values to JSON and fills unchanged TOAST values from the old row. The log and the
//! router see only [`Output`]s.

mod relations;
mod transaction;

pub use relations::RelationCache;
pub use transaction::{Assembler, ChangeError, Output};
