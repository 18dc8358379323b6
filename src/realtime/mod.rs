//! WebSocket sessions on `WS_PATH`.

pub mod protocol;
pub mod session;
