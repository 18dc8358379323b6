//! The OpenAPI document (`GET /openapi.json`), generated from the handlers'
//! annotations and the body types.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{auth, error, storage};

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
        description = "Auth & Files REST API. Every error answers `{\"error\":{\"message\",\"code\",\"status\"}}`. Row changes reach subscribers through the WebSocket server, never from these routes."
    ),
    paths(
        super::health,
        auth::sign_up,
        auth::sign_in,
        auth::sign_out,
        storage::upload,
        storage::list,
        storage::delete,
        storage::object,
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
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Accounts and sessions"),
        (name = "storage", description = "Buckets, folders and files"),
        (name = "system", description = "Health"),
    )
)]
pub struct ApiDoc;

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
