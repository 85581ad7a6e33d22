//! A small demo app to put behind sessiongate: a login form, a page that
//! shows the identity headers it received, and logout.
//!
//! It never sees a password or a token: it tells the gateway who logged in
//! with `x-sessiongate-login`, and the gateway does the rest. Run it with
//! `scripts/demo.sh`, which also starts the gateway in front of it.
//! Listens on `DEMO_LISTEN` (default 127.0.0.1:3000).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Resp = Response<Full<Bytes>>;

fn page(title: &str, body: &str) -> Resp {
    let html = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>{title}</title>\
         <style>body{{font-family:sans-serif;max-width:46rem;margin:3rem auto;padding:0 1rem}}\
         table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:.3rem .6rem;font-family:monospace}}\
         button,input{{font-size:1rem;padding:.3rem .6rem}}</style></head>\
         <body><h1>{title}</h1>{body}</body></html>"
    );
    Response::builder()
        .header(CONTENT_TYPE, "text/html; charset=utf-8")
        .body(Full::new(Bytes::from(html)))
        .expect("static response")
}

fn see_other(location: &str) -> hyper::http::response::Builder {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(LOCATION, location)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Decodes one `application/x-www-form-urlencoded` value.
fn form_value(form: &str, key: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if k != key {
            return None;
        }
        let bytes = v.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    })
}

async fn handle(req: Request<Incoming>) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let resp = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/public/login") => page(
            "Log in",
            "<p>This demo app has no passwords: pick a user name and the gateway \
             creates a session for it.</p>\
             <form method=post action=/public/login>\
             <p><input name=user placeholder='user name' required autofocus></p>\
             <p><label><input type=checkbox name=remember value=1> remember me</label></p>\
             <p><button>Log in</button></p></form>",
        ),
        (Method::POST, "/public/login") => {
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let form = String::from_utf8_lossy(&body).to_string();
            match form_value(&form, "user").map(|u| u.trim().to_string()) {
                Some(user) if !user.is_empty() && user.len() <= 64 => {
                    let remember = form_value(&form, "remember").is_some();
                    let attributes =
                        format!(r#"{{"remember_me":"{remember}","login_via":"demo"}}"#);
                    see_other("/")
                        .header("x-sessiongate-login", user)
                        .header("x-sessiongate-attributes", attributes)
                        .body(Full::new(Bytes::new()))
                        .expect("valid response")
                }
                _ => see_other("/public/login")
                    .body(Full::new(Bytes::new()))
                    .expect("valid response"),
            }
        }
        (Method::POST, "/logout") => {
            let scope = if query == "all" { "all" } else { "current" };
            see_other("/public/login")
                .header("x-sessiongate-logout", scope)
                .body(Full::new(Bytes::new()))
                .expect("valid response")
        }
        _ => {
            let mut rows = String::new();
            let mut names: Vec<_> = req.headers().keys().map(|k| k.as_str()).collect();
            names.sort();
            names.dedup();
            for name in names {
                for value in req.headers().get_all(name) {
                    let v = escape(&String::from_utf8_lossy(value.as_bytes()));
                    let strong = name == "x-user-id" || name == "x-session-id";
                    let (a, b) = if strong { ("<b>", "</b>") } else { ("", "") };
                    rows.push_str(&format!("<tr><td>{a}{name}{b}</td><td>{a}{v}{b}</td></tr>"));
                }
            }
            let user = req
                .headers()
                .get("x-user-id")
                .map(|v| escape(&String::from_utf8_lossy(v.as_bytes())))
                .unwrap_or_else(|| "(nobody — this route should not be public!)".into());
            page(
                &format!("Hello, {user}"),
                &format!(
                    "<p>sessiongate authenticated this request and told the app who you are. \
                     These are the headers the app received for <code>{}</code>:</p>\
                     <table>{rows}</table>\
                     <form method=post action=/logout><p><button>Log out</button></p></form>\
                     <form method=post action='/logout?all'><p><button>Log out everywhere</button></p></form>",
                    escape(&path)
                ),
            )
        }
    };
    Ok(resp)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::var("DEMO_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()
        .expect("DEMO_LISTEN is an address like 127.0.0.1:3000");
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("demo app listening on http://{addr} (reach it through the gateway)");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
                .await;
        });
    }
}
