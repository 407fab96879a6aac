//! The page, its script and style, embedded in the binary (`include_str!`):
//! the app works offline and loads nothing from the internet.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The app's page (a single page; the script draws each view).
pub const INDEX_HTML: &str = include_str!("assets/index.html");
/// The app's script (no framework; Swedish and English texts).
pub const APP_JS: &str = include_str!("assets/app.js");
/// The app's style (laptop and phone widths, visible focus, AA contrast).
pub const APP_CSS: &str = include_str!("assets/app.css");
/// The login page: hands the secret from the URL fragment to the server once.
pub const LOGIN_HTML: &str = include_str!("assets/login.html");
/// The login page's script.
pub const LOGIN_JS: &str = include_str!("assets/login.js");

fn with_type(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `GET /`.
pub async fn index() -> Response {
    with_type("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /app.js`.
pub async fn app_js() -> Response {
    with_type("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /app.css`.
pub async fn app_css() -> Response {
    with_type("text/css; charset=utf-8", APP_CSS)
}

/// `GET /login`.
pub async fn login_html() -> Response {
    with_type("text/html; charset=utf-8", LOGIN_HTML)
}

/// `GET /login.js`.
pub async fn login_js() -> Response {
    with_type("text/javascript; charset=utf-8", LOGIN_JS)
}
