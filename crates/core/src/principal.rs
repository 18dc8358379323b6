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

impl Role {
    /// The PostgreSQL role of that name (Supabase's roles).
    pub fn database_role(self) -> &'static str {
        match self {
            Role::Anon => "anon",
            Role::Authenticated => "authenticated",
            Role::Service => "service_role",
        }
    }
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
    /// The claims `auth.uid()`, `auth.role()` and `auth.jwt()` read
    /// (`request.jwt.claims`), as JSON text.
    pub fn jwt_claims(&self) -> String {
        let mut c = serde_json::json!({"role": self.role.database_role()});
        if let Some(u) = &self.user_id {
            c["sub"] = serde_json::json!(u);
            c["aud"] = serde_json::json!("authenticated");
        }
        if let Some(e) = &self.email {
            c["email"] = serde_json::json!(e);
        }
        if let Some(s) = self.session_id {
            c["session_id"] = serde_json::json!(s.to_string());
        }
        if let Some(x) = self.expires_at {
            c["exp"] = serde_json::json!(x);
        }
        c.to_string()
    }

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
