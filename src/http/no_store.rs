//! Answers that carry a secret (a new API key, an issued token): no cache may keep them
//! (`Cache-Control: no-store`, and `Pragma: no-cache` for HTTP/1.0 caches), as RFC 6749
//! asks of token answers. A shared proxy or a browser's cache would otherwise hold a key
//! that is shown only once.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

/// `T`'s answer, marked for no cache to keep.
pub struct NoStore<T>(pub T);

impl<T: IntoResponse> IntoResponse for NoStore<T> {
    fn into_response(self) -> Response {
        let mut response = self.0.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        response
    }
}
