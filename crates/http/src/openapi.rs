//! The OpenAPI document (`GET /openapi.json`), generated from the handlers'
//! annotations and the body types.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{auth, error, kingshare, ops, storage};

/// A file's bytes, for responses served with the file's stored content type
/// (described as `*/*`: any type may come back).
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub(crate) struct FileBytes(Vec<u8>);

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Aether",
        description = "Aether REST API: Auth & Files, channels, shares, operations. Every error answers `{\"error\":{\"message\",\"code\",\"status\"}}`. Row changes reach subscribers through the WebSocket server, never from these routes."
    ),
    paths(
        ops::health,
        auth::sign_up,
        auth::sign_in,
        auth::sign_out,
        storage::upload,
        storage::list,
        storage::delete,
        storage::object,
        ops::ws_status,
        ops::create_channel,
        ops::metrics_connections,
        ops::metrics_messages,
        ops::metrics_channels,
        ops::metrics_errors,
        kingshare::create,
        kingshare::list,
        kingshare::revoke,
        kingshare::fetch,
        kingshare::stats,
        kingshare::cleanup,
        kingshare::notify,
    ),
    components(schemas(
        error::ErrorBody,
        error::ErrorDetail,
        auth::Credentials,
        auth::AuthResponse,
        auth::UserBody,
        auth::SessionBody,
        auth::SuccessBody,
        storage::UploadForm,
        storage::UploadResponse,
        storage::ListResponse,
        storage::ListedFile,
        storage::ListedFolder,
        storage::DeleteRequest,
        ops::ChannelRequest,
        kingshare::CreateShare,
        kingshare::Notify,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Accounts and sessions"),
        (name = "storage", description = "Buckets, folders and files"),
        (name = "system", description = "Health"),
        (name = "realtime", description = "WebSocket status and channels (the sockets themselves are documented in docs/)"),
        (name = "shares", description = "KingShare file shares"),
        (name = "operations", description = "Metrics and connection management (service_role)"),
    )
)]
pub(crate) struct ApiDoc;

pub(crate) async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
