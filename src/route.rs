//! The route phase: the request's one path, and the route it picks.
//!
//! The path is normalized once ([`crate::path`]); from then on the
//! request carries only that path, and the longest matching prefix picks
//! the route. The proxy and forward-auth route the same way, through
//! [`Routes`].

use std::borrow::Cow;

use http::uri::PathAndQuery;
use http::{Method, Uri};

use crate::config::{Config, RouteConfig};
use crate::error::ProxyError;
use crate::metrics::{Metrics, RouteMetrics};

/// A configured route with its metric label and handles.
pub(crate) struct Route {
    pub(crate) config: RouteConfig,
    pub(crate) label: &'static str,
    pub(crate) metrics: RouteMetrics,
}

impl std::ops::Deref for Route {
    type Target = RouteConfig;
    fn deref(&self) -> &RouteConfig {
        &self.config
    }
}

/// The configured routes, most specific first.
pub(crate) struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    pub(crate) fn new(config: &Config, metrics: &Metrics) -> Routes {
        let mut routes: Vec<Route> = config
            .routes
            .iter()
            .map(|r| {
                let label = crate::metrics::intern(&r.prefix);
                Route {
                    label,
                    metrics: metrics.route(label),
                    config: r.clone(),
                }
            })
            .collect();
        // Longest prefix first, so the first match is the most specific;
        // of two of one length, the exact-case one.
        routes.sort_by_key(|r| (std::cmp::Reverse(r.prefix.len()), r.case_insensitive));
        Routes { routes }
    }

    /// The place of a normalized path's route. Prefixes hold only
    /// unreserved characters and `/` (config validation), so matching the
    /// normal form is matching what the upstream decodes it to.
    pub(crate) fn index(&self, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| {
            if r.case_insensitive {
                path.as_bytes()
                    .get(..r.prefix.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(r.prefix.as_bytes()))
            } else {
                path.starts_with(&r.prefix)
            }
        })
    }

    pub(crate) fn find(&self, path: &str) -> Option<&Route> {
        self.index(path).map(|i| &self.routes[i])
    }
}

impl std::ops::Index<usize> for Routes {
    type Output = Route;
    fn index(&self, i: usize) -> &Route {
        &self.routes[i]
    }
}

/// The request's URI with its path in normal form, `None` when it
/// already is (nearly always: then nothing is copied), or
/// [`ProxyError::InvalidPath`] for an ambiguous path and for targets that
/// are not paths (CONNECT's authority form, `OPTIONS *`).
pub(crate) fn normalized_uri(method: &Method, uri: &Uri) -> Result<Option<Uri>, ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::InvalidPath);
    }
    let path = match crate::path::normalize(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(None),
        Ok(Cow::Owned(path)) => path,
        Err(reason) => {
            tracing::debug!(%reason, "request path refused");
            return Err(ProxyError::InvalidPath);
        }
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|_| ProxyError::InvalidPath)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| ProxyError::InvalidPath)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uri_carries_the_normalized_path_and_the_query_unchanged() {
        let get = Method::GET;
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(
            normalized_uri(&get, &uri("/public/x?a=%2e%2e")).unwrap(),
            None
        );
        let abs = normalized_uri(&get, &uri("http://h:1/public/../secret?q=/../%2f"));
        assert_eq!(
            abs.unwrap().unwrap().to_string(),
            "http://h:1/secret?q=/../%2f"
        );
        let origin = normalized_uri(&get, &uri("//%61pp/./x/"));
        assert_eq!(origin.unwrap().unwrap().to_string(), "/app/x/");
        for target in ["/app%2fx", "/a/%2e%2e/b", "*"] {
            assert!(matches!(
                normalized_uri(&get, &uri(target)),
                Err(ProxyError::InvalidPath)
            ));
        }
        assert!(matches!(
            normalized_uri(&Method::CONNECT, &uri("example.com:443")),
            Err(ProxyError::InvalidPath)
        ));
        assert!(matches!(
            normalized_uri(&Method::OPTIONS, &uri("*")),
            Err(ProxyError::InvalidPath)
        ));
    }
}
