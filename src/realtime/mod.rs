//! WebSocket sessions on `WS_PATH`.

pub mod hub;
pub mod kingshare;
pub mod phoenix;
pub mod phoenix_hub;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod stats;
