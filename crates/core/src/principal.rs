//! Who a request or connection acts as, once its token has been checked.
//!
//! Every layer above the database speaks of principals, and only the auth core
//! makes them, so the type lives at the bottom of the graph.

/// The database role a principal acts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Anon,
    Authenticated,
    Service,
}

/// The identity a request or connection acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    /// Lower-case hyphenated UUID text, as PostgreSQL prints it.
    pub user_id: Option<String>,
    pub session_id: Option<uuid::Uuid>,
    pub email: Option<String>,
    /// Seconds since the epoch; `None` for anonymous connections.
    pub expires_at: Option<i64>,
}

impl Principal {
    pub fn anonymous() -> Self {
        Principal {
            role: Role::Anon,
            user_id: None,
            session_id: None,
            email: None,
            expires_at: None,
        }
    }

    /// The service itself (`service_role`, no user): what server-side work acts as.
    pub fn service() -> Self {
        Principal {
            role: Role::Service,
            ..Principal::anonymous()
        }
    }

    pub fn is_service(&self) -> bool {
        self.role == Role::Service
    }
}
