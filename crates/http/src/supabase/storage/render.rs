//! Image transformations (`/render/image/…`, storage-js's `transform`
//! option): a resized copy of a stored PNG, JPEG or WebP image, made on
//! request in its own format. The source is at most [`MAX_SOURCE_BYTES`],
//! decoding is bounded in pixels and bytes, and at most [`CONCURRENT`]
//! transformations run at once, off the async runtime.

use std::io::Cursor;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt as _;
use image::{ImageFormat, ImageReader, imageops::FilterType};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::errors::StorageApiError;
use super::owners::{Caller, object_path};
use crate::AppState;
use crate::extract::ApiPath;
use crate::storage::read_response;
use crate::supabase::decode_component;
use aether_auth::Principal;
use aether_storage::{ObjectPath, ObjectRead};

/// The largest image transformed (Supabase's limit is 25 MB).
const MAX_SOURCE_BYTES: u64 = 25 << 20;
/// The largest width or height asked for (Supabase's).
const MAX_SIDE: u32 = 2500;
/// Pixels a source may have (Supabase's limit is 50 megapixels).
const MAX_PIXELS: u64 = 50_000_000;
/// Bytes a decoder may allocate.
const MAX_DECODE_BYTES: u64 = 256 << 20;
/// Bytes a resize's intermediate image may take.
const MAX_RESIZE_BYTES: u64 = 256 << 20;
/// Transformations at once: each may hold a source, a decoded image and a
/// resize's intermediate.
const CONCURRENT: usize = 2;
/// How long a request waits for a slot before it is told to come back.
const WAIT: Duration = Duration::from_secs(10);

static SLOTS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(CONCURRENT)));

/// How the image fits `width` × `height` when both are given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Resize {
    /// Fills both, cropping what is over (keeps the aspect ratio).
    #[default]
    Cover,
    /// Fits inside both (keeps the aspect ratio).
    Contain,
    /// Stretches to both.
    Fill,
}

/// A transformation as storage-js sends it (query parameters, or the
/// `transform` of a signed URL).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Transform {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) height: Option<u32>,
    #[serde(default)]
    pub(super) resize: Resize,
    /// 20–100, for JPEG (80 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) quality: Option<u8>,
    /// `origin` (the only one: the image keeps its format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) format: Option<String>,
}

impl Transform {
    /// From a URL's query (`width`, `height`, `resize`, `quality`, `format`;
    /// anything else, such as storage-js's `cacheNonce`, is ignored).
    pub(super) fn from_query(query: &str) -> Result<Transform, StorageApiError> {
        let mut t = Transform::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (decode_component(k), decode_component(v));
            let number = || {
                v.parse::<u32>()
                    .map_err(|_| StorageApiError::invalid(format!("{k} must be a whole number")))
            };
            match k.as_str() {
                "width" => t.width = Some(number()?),
                "height" => t.height = Some(number()?),
                "quality" => t.quality = Some(u8::try_from(number()?).unwrap_or(u8::MAX)),
                "resize" => {
                    t.resize = serde_json::from_value(serde_json::json!(v)).map_err(|_| {
                        StorageApiError::invalid("resize must be cover, contain or fill")
                    })?;
                }
                "format" => t.format = Some(v),
                _ => {}
            }
        }
        t.check()?;
        Ok(t)
    }

    /// Supabase's bounds: sides 1–2,500, quality 20–100, format `origin`.
    pub(super) fn check(&self) -> Result<(), StorageApiError> {
        for (name, side) in [("width", self.width), ("height", self.height)] {
            if side.is_some_and(|s| s == 0 || s > MAX_SIDE) {
                return Err(StorageApiError::invalid(format!(
                    "{name} must be from 1 to {MAX_SIDE}"
                )));
            }
        }
        if self.quality.is_some_and(|q| !(20..=100).contains(&q)) {
            return Err(StorageApiError::invalid("quality must be from 20 to 100"));
        }
        if self.format.as_deref().is_some_and(|f| f != "origin") {
            return Err(StorageApiError::invalid(
                "format must be origin: a transformed image keeps its format",
            ));
        }
        Ok(())
    }

    /// What to do to a `w` × `h` image: the part of it kept (`x`, `y`,
    /// width, height: all of it but for `cover`, which crops to the target's
    /// aspect ratio first) and the size it becomes. One side given keeps the
    /// aspect ratio, both sides within [`MAX_SIDE`].
    fn plan(&self, w: u32, h: u32) -> ((u32, u32, u32, u32), (u32, u32)) {
        // `a * b / c`, rounded, at least 1 and at most MAX_SIDE.
        let scaled = |a: u32, b: u32, c: u32| {
            let v = (u64::from(a) * u64::from(b) + u64::from(c) / 2) / u64::from(c.max(1));
            u32::try_from(v.clamp(1, u64::from(MAX_SIDE))).unwrap_or(MAX_SIDE)
        };
        // Fits `w` × `h` inside `bw` × `bh`, keeping its aspect ratio.
        let fit = |bw: u32, bh: u32| {
            if u64::from(w) * u64::from(bh) >= u64::from(bw) * u64::from(h) {
                (bw, scaled(h, bw, w))
            } else {
                (scaled(w, bh, h), bh)
            }
        };
        let all = (0, 0, w, h);
        match (self.width, self.height, self.resize) {
            (None, None, _) => (all, (w, h)),
            (Some(tw), None, _) => (all, fit(tw, MAX_SIDE)),
            (None, Some(th), _) => (all, fit(MAX_SIDE, th)),
            (Some(tw), Some(th), Resize::Fill) => (all, (tw, th)),
            (Some(tw), Some(th), Resize::Contain) => (all, fit(tw, th)),
            (Some(tw), Some(th), Resize::Cover) => {
                let (cw, ch) = if u64::from(w) * u64::from(th) > u64::from(tw) * u64::from(h) {
                    (scaled(h, tw, th).min(w), h)
                } else {
                    (w, scaled(w, th, tw).min(h))
                };
                (((w - cw) / 2, (h - ch) / 2, cw, ch), (tw, th))
            }
        }
    }

    /// Resizes and encodes `src` (a whole image file) in its own format.
    fn apply(&self, src: &[u8]) -> Result<(Vec<u8>, &'static str), StorageApiError> {
        let not_image = || {
            StorageApiError::invalid(
                "the object is not a PNG, JPEG or WebP image Aether can transform",
            )
        };
        let mut reader = ImageReader::new(Cursor::new(src))
            .with_guessed_format()
            .map_err(|_| not_image())?;
        let format = reader.format().ok_or_else(not_image)?;
        let mime = match format {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::WebP => "image/webp",
            _ => return Err(not_image()),
        };
        let (w, h) = reader.into_dimensions().map_err(|_| not_image())?;
        if u64::from(w) * u64::from(h) > MAX_PIXELS {
            return Err(StorageApiError::invalid(format!(
                "the image has more than {MAX_PIXELS} pixels"
            )));
        }
        reader = ImageReader::new(Cursor::new(src))
            .with_guessed_format()
            .map_err(|_| not_image())?;
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(MAX_DECODE_BYTES);
        reader.limits(limits);
        let img = reader.decode().map_err(|_| not_image())?;
        let ((x, y, cw, ch), (ow, oh)) = self.plan(w, h);
        // Resizing passes through a float image of one side's new size by
        // the other's old one (16 bytes a pixel): bounded like decoding.
        let pass = (u64::from(cw) * u64::from(oh)).max(u64::from(ow) * u64::from(ch));
        if pass.saturating_mul(16) > MAX_RESIZE_BYTES {
            return Err(StorageApiError::invalid(
                "the image is too large to resize to that size",
            ));
        }
        let img = if (x, y, cw, ch) == (0, 0, w, h) {
            img
        } else {
            img.crop_imm(x, y, cw, ch)
        };
        let out = if (ow, oh) == (cw, ch) {
            img
        } else {
            img.resize_exact(ow, oh, FilterType::Triangle)
        };
        let mut bytes = Vec::new();
        let failed = |e: image::ImageError| {
            StorageApiError::from(aether_storage::StorageError::internal(format!(
                "encoding an image: {e}"
            )))
        };
        match format {
            ImageFormat::Jpeg => {
                let q = self.quality.unwrap_or(80);
                let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, q);
                out.to_rgb8().write_with_encoder(enc).map_err(failed)?;
            }
            f => out
                .write_to(&mut Cursor::new(&mut bytes), f)
                .map_err(failed)?,
        }
        Ok((bytes, mime))
    }
}

/// The transformed object: read whole (it is small enough), transformed off
/// the runtime, answered with the object's headers.
async fn render(read: ObjectRead, transform: Transform) -> Result<Response, StorageApiError> {
    if read.file.size > MAX_SOURCE_BYTES {
        return Err(StorageApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "EntityTooLarge",
            "Payload too large",
            format!("images over {MAX_SOURCE_BYTES} bytes are not transformed"),
        ));
    }
    // The slot is taken before the source is read and travels with the
    // work: a client that goes away frees it only when the work is done.
    let slot = tokio::time::timeout(WAIT, Arc::clone(&SLOTS).acquire_owned())
        .await
        .map_err(|_| {
            StorageApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SlowDown",
                "Service Unavailable",
                "image transformations are busy: try again",
            )
        })?
        .map_err(aether_storage::StorageError::internal)?;
    let mut src = Vec::with_capacity(usize::try_from(read.file.size).unwrap_or(0));
    let mut body = read.body;
    while let Some(chunk) = body.next().await {
        src.extend_from_slice(&chunk?);
        if src.len() as u64 > MAX_SOURCE_BYTES {
            return Err(StorageApiError::invalid(
                "the object grew while it was read",
            ));
        }
    }
    let (bytes, mime) = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        transform.apply(&src)
    })
    .await
    .map_err(aether_storage::StorageError::internal)??;
    let mut file = read.file;
    file.size = bytes.len() as u64;
    file.mime_type = mime.to_owned();
    let out = ObjectRead {
        file,
        bucket_public: read.bucket_public,
        span: None,
        body: futures_util::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed(),
    };
    read_response(out).map_err(StorageApiError::from)
}

pub(super) async fn open_and_render(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    path: &ObjectPath,
    transform: Transform,
    expect: Option<uuid::Uuid>,
) -> Result<Response, StorageApiError> {
    let read = state.storage.open(Some(viewer), bucket, path, None).await?;
    if expect.is_some_and(|id| id != read.file.id) {
        return Err(StorageApiError::no_such_key());
    }
    render(read, transform).await
}

/// `GET /storage/v1/render/image/authenticated/{bucket}/{path}` (`download`
/// with `transform`).
pub(crate) async fn render_authenticated(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    uri: axum::http::Uri,
) -> Result<Response, StorageApiError> {
    let path = object_path(&path)?;
    let t = Transform::from_query(uri.query().unwrap_or(""))?;
    open_and_render(&state, &p, &bucket, &path, t, None).await
}

/// `GET /storage/v1/render/image/public/{bucket}/{path}` (`getPublicUrl`
/// with `transform`): public buckets, no key needed.
pub(crate) async fn render_public(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    uri: axum::http::Uri,
    _headers: HeaderMap,
) -> Result<Response, StorageApiError> {
    let path = object_path(&path)?;
    let t = Transform::from_query(uri.query().unwrap_or(""))?;
    if !state.storage.bucket(&bucket).await?.public {
        return Err(StorageApiError::no_such_key());
    }
    open_and_render(&state, &Principal::anonymous(), &bucket, &path, t, None).await
}

#[cfg(test)]
mod tests {
    use image::DynamicImage;

    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbaImage::from_fn(w, h, |x, y| {
            image::Rgba([(x % 256) as u8, (y % 256) as u8, 7, 255])
        });
        let mut out = Vec::new();
        DynamicImage::ImageRgba8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn size_of(bytes: &[u8]) -> (u32, u32) {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .unwrap()
            .into_dimensions()
            .unwrap()
    }

    #[test]
    fn sizes_follow_the_mode_and_keep_the_aspect_ratio_when_one_side_is_given() {
        let src = png(400, 200);
        let t = |q: &str| Transform::from_query(q).unwrap();
        let (out, mime) = t("width=100").apply(&src).unwrap();
        assert_eq!((size_of(&out), mime), ((100, 50), "image/png"));
        assert_eq!(size_of(&t("height=50").apply(&src).unwrap().0), (100, 50));
        assert_eq!(
            size_of(&t("width=100&height=100").apply(&src).unwrap().0),
            (100, 100),
            "cover crops"
        );
        assert_eq!(
            size_of(
                &t("width=100&height=100&resize=contain")
                    .apply(&src)
                    .unwrap()
                    .0
            ),
            (100, 50),
            "contain fits inside"
        );
        assert_eq!(
            size_of(&t("width=30&height=90&resize=fill").apply(&src).unwrap().0),
            (30, 90)
        );
        assert_eq!(
            size_of(&t("cacheNonce=1").apply(&src).unwrap().0),
            (400, 200)
        );
    }

    #[test]
    fn bad_parameters_and_non_images_are_refused_without_panicking() {
        for q in [
            "width=0",
            "width=2501",
            "height=-1",
            "width=abc",
            "quality=19",
            "quality=101",
            "quality=99999999999",
            "resize=crop",
            "format=webp",
        ] {
            assert!(Transform::from_query(q).is_err(), "{q}");
        }
        let t = Transform::default();
        assert!(t.apply(b"not an image").is_err());
        assert!(t.apply(&png(10, 10)[..40]).is_err(), "a truncated PNG");
        assert!(t.apply(b"").is_err());
    }

    #[test]
    fn plans_keep_within_bounds_and_aspect() {
        let t = |q: &str| Transform::from_query(q).unwrap();
        // A very wide image, one side asked: the other follows, within bounds.
        assert_eq!(t("height=2500").plan(50_000_000, 1).1, (2500, 1));
        assert_eq!(t("width=100").plan(1, 50_000).1, (1, 2500));
        // Cover crops the middle to the target's aspect ratio.
        assert_eq!(
            t("width=100&height=100").plan(400, 200),
            ((100, 0, 200, 200), (100, 100))
        );
        assert_eq!(
            t("width=100&height=50&resize=contain").plan(200, 400).1,
            (25, 50)
        );
        assert_eq!(t("").plan(7, 9), ((0, 0, 7, 9), (7, 9)));
    }

    #[test]
    fn a_resize_too_large_for_its_budget_is_refused() {
        // 20,000 × 1: small to decode; to 2,500 high (cover, the whole
        // width kept per row pass) it would need a large intermediate.
        let src = png(20_000, 1);
        assert!(
            Transform::from_query("width=2500&height=2500&resize=fill")
                .unwrap()
                .apply(&src)
                .is_err()
        );
        assert!(
            Transform::from_query("width=100")
                .unwrap()
                .apply(&src)
                .is_ok()
        );
    }

    #[test]
    fn a_jpeg_stays_a_jpeg_and_quality_changes_its_size() {
        let img = image::RgbImage::from_fn(300, 300, |x, y| {
            image::Rgb([(x * y % 256) as u8, (x % 256) as u8, (y % 256) as u8])
        });
        let mut src = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut src), ImageFormat::Jpeg)
            .unwrap();
        let t = |q: &str| Transform::from_query(q).unwrap();
        let (low, mime) = t("width=200&quality=20").apply(&src).unwrap();
        let (high, _) = t("width=200&quality=100").apply(&src).unwrap();
        assert_eq!(mime, "image/jpeg");
        assert!(low.len() < high.len(), "{} < {}", low.len(), high.len());
    }
}
