//! Logs as JSON lines in the seed document's format:
//! `{"timestamp","level","event","data":{"component","details"}}`, or plain text
//! when stderr is a terminal.
//!
//! `event` is the event's `event` field when it has one (security events use
//! names like `token_refused`, `rate_limited`, `connection_limit`), else its
//! message. `component` is the task (`router`, `replication`, …) or the module.
//! Fields go to `details`. Tokens, passwords and row values are never logged.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The component of an event outside any task: the module under the crate root,
/// except in the HTTP, auth and storage crates, whose events keep the names
/// they had as modules of the binary (`api`, `http`, `auth`, `storage`), so
/// log filters keep working.
fn component_of(target: &str) -> &str {
    let mut parts = target.split("::");
    let krate = parts.next().unwrap_or(target);
    match (krate, parts.next()) {
        ("aether_auth", _) => "auth",
        ("aether_storage", _) => "storage",
        ("aether_http", Some("edge")) => "http",
        ("aether_http", _) => "api",
        (_, Some(module)) => module,
        (_, None) => krate,
    }
}

#[derive(Default)]
struct Fields {
    message: Option<String>,
    event: Option<String>,
    details: Map<String, Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "event" => self.event = Some(value.to_owned()),
            "message" => self.message = Some(value.to_owned()),
            name => {
                self.details
                    .insert(name.to_owned(), Value::String(value.to_owned()));
            }
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.details
            .insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.details
            .insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.details
            .insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.details
            .insert(field.name().to_owned(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// The seed document's JSON line format.
pub struct SeedJson;

impl<S, N> FormatEvent<S, N> for SeedJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        // The innermost `task` span names the component; else the module.
        let task = ctx.event_scope().and_then(|scope| {
            scope
                .from_root()
                .filter(|s| s.name() == "task")
                .last()
                .and_then(|span| {
                    let ext = span.extensions();
                    let f = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>()?;
                    let text = f.fields.as_str();
                    text.split("name=").nth(1).map(|n| {
                        n.trim_matches('"')
                            .split(['"', ' '])
                            .next()
                            .unwrap_or("")
                            .to_owned()
                    })
                })
        });
        let target = event.metadata().target();
        let component = task.unwrap_or_else(|| component_of(target).to_owned());
        let (name, details) = match (fields.event, fields.message) {
            (Some(e), Some(m)) => {
                fields.details.insert("message".into(), Value::String(m));
                (e, fields.details)
            }
            (Some(e), None) => (e, fields.details),
            (None, Some(m)) => (m, fields.details),
            (None, None) => (String::new(), fields.details),
        };
        let line = serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": event.metadata().level().as_str().to_ascii_lowercase(),
            "event": name,
            "data": {"component": component, "details": details},
        });
        writeln!(writer, "{line}")
    }
}

/// Installs the global subscriber: JSON lines unless stderr is a terminal.
pub fn init() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.event_format(SeedJson).init();
    }
}

#[cfg(test)]
mod tests {
    use super::component_of;

    #[test]
    fn components_are_modules_and_the_moved_crates_keep_their_names() {
        assert_eq!(component_of("aether::server"), "server");
        assert_eq!(component_of("aether_router::catchup"), "catchup");
        assert_eq!(component_of("aether_http"), "api");
        assert_eq!(component_of("aether_http::supabase::rest"), "api");
        assert_eq!(component_of("aether_http::edge::conn"), "http");
        assert_eq!(component_of("aether_auth::service"), "auth");
        assert_eq!(component_of("aether_storage"), "storage");
        assert_eq!(component_of("hyper"), "hyper");
    }
}
