//! Who may read what. The probes (`/healthz`, `/ready`, `/ping`) are open to
//! all; every other path answers loopback as before, and a remote client only
//! over TLS with a bearer token the apiserver authenticates and authorizes
//! (reviews cached, see `cache`). The verdict is pure given the reviewer's
//! answers; [`guarded`] puts it in front of the router.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::cache::{ReviewCache, CAPACITY, LIFETIMES};
use super::review::{ReviewError, Reviewer, User};

/// Paths that show nothing about pods, addresses or rules: the kubelet's
/// probes reach them over plain HTTP from the node's own address.
pub const OPEN_PATHS: [&str; 3] = ["/healthz", "/ready", "/ping"];

/// The client of one connection, as the server saw it: set on every request
/// by `serve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The connection is TLS.
    pub tls: bool,
}

/// Why a request was refused (`podnat_http_requests_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A remote client over plain HTTP.
    PlainHttp,
    /// No `Authorization: Bearer` header.
    NoToken,
    /// The apiserver does not know the token.
    InvalidToken,
    /// The token's user may not get the path.
    Forbidden,
    /// The apiserver did not answer the review.
    ReviewFailed,
}

impl Refusal {
    pub fn metric_label(self) -> &'static str {
        match self {
            Refusal::PlainHttp => "plain_http",
            Refusal::NoToken => "no_token",
            Refusal::InvalidToken => "invalid_token",
            Refusal::Forbidden => "forbidden",
            Refusal::ReviewFailed => "review_failed",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            // 403, not 401: asking for a token here would invite sending it
            // in clear text.
            Refusal::PlainHttp | Refusal::Forbidden => StatusCode::FORBIDDEN,
            Refusal::NoToken | Refusal::InvalidToken => StatusCode::UNAUTHORIZED,
            // Never fail open: without the apiserver nobody remote reads.
            Refusal::ReviewFailed => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What [`Access::check_at`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A probe path, loopback, or an allowed token.
    Pass,
    Refused {
        why: Refusal,
        message: String,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// token (TokenReview) or access (SubjectAccessReview).
    pub review: &'static str,
    /// hit or miss; a miss is one review sent to the apiserver.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

/// The counters of the HTTP side's access checks.
#[derive(Clone, Debug, Default)]
pub struct AccessMetrics {
    pub cache: Family<CacheLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
}

impl AccessMetrics {
    pub fn register(&self, registry: &mut Registry) {
        // Every series from the start, at 0, so rates work from the first scrape.
        for review in ["token", "access"] {
            for result in ["hit", "miss"] {
                let _ = self.cache.get_or_create(&CacheLabels { review, result });
            }
        }
        for why in [
            Refusal::PlainHttp,
            Refusal::NoToken,
            Refusal::InvalidToken,
            Refusal::Forbidden,
            Refusal::ReviewFailed,
        ] {
            let _ = self.refused.get_or_create(&RefusedLabels {
                reason: why.metric_label(),
            });
        }
        registry.register(
            "http_auth_cache",
            "Review answers reused (hit) or asked of the apiserver (miss), by review",
            self.cache.clone(),
        );
        registry.register(
            "http_requests_refused",
            "Requests to protected paths refused, by reason",
            self.refused.clone(),
        );
    }

    /// The count of one cache outcome (the bench prints it).
    pub fn cache_count(&self, review: &'static str, result: &'static str) -> u64 {
        self.cache
            .get_or_create(&CacheLabels { review, result })
            .get()
    }
}

/// The token as a cache key: its SHA-256, so the cache does not keep
/// usable credentials around for minutes.
type TokenKey = [u8; 32];

/// The access checks with their reviewer and caches.
pub struct Access {
    reviewer: Arc<dyn Reviewer>,
    tokens: Mutex<ReviewCache<TokenKey, Option<User>>>,
    paths: Mutex<ReviewCache<(User, String), bool>>,
    pub metrics: AccessMetrics,
}

impl Access {
    pub fn new(reviewer: Arc<dyn Reviewer>) -> Self {
        Access {
            reviewer,
            tokens: Mutex::new(ReviewCache::new(CAPACITY)),
            paths: Mutex::new(ReviewCache::new(CAPACITY)),
            metrics: AccessMetrics::default(),
        }
    }

    /// The verdict on `path` (without query) for `peer`, given its
    /// `Authorization` header, at `now` (the cache's clock; the bench
    /// simulates an hour with it).
    pub async fn check_at(
        &self,
        peer: Peer,
        path: &str,
        authorization: Option<&str>,
        now: Instant,
    ) -> Verdict {
        if OPEN_PATHS.contains(&path) || is_loopback(peer.addr.ip()) {
            return Verdict::Pass;
        }
        let refuse = |why, message: String| Verdict::Refused { why, message };
        if !peer.tls {
            return refuse(
                Refusal::PlainHttp,
                format!(
                    "{path} is served to remote clients only over https, with a bearer token \
                     (Authorization: Bearer ...) the apiserver accepts and RBAC allows to get \
                     {path}; plain http is open for /healthz, /ready and /ping only\n"
                ),
            );
        }
        let Some(token) = authorization.and_then(bearer) else {
            return refuse(
                Refusal::NoToken,
                format!("{path} needs a bearer token (Authorization: Bearer ...)\n"),
            );
        };
        let user = match self.authenticate(token, now).await {
            Ok(Some(user)) => user,
            Ok(None) => {
                return refuse(
                    Refusal::InvalidToken,
                    "the apiserver does not accept this bearer token\n".into(),
                )
            }
            Err(e) => return self.unanswered(&e),
        };
        match self.authorize(&user, path, now).await {
            Ok(true) => Verdict::Pass,
            Ok(false) => refuse(
                Refusal::Forbidden,
                format!(
                    "user {:?} may not get {path}: bind a ClusterRole with nonResourceURLs [{path}] \
                     and verbs [get] (the chart's <release>-metrics-reader)\n",
                    user.name
                ),
            ),
            Err(e) => self.unanswered(&e),
        }
    }

    fn unanswered(&self, e: &ReviewError) -> Verdict {
        tracing::warn!(error = %e, "cannot review a bearer token; refusing the request");
        Verdict::Refused {
            why: Refusal::ReviewFailed,
            message: "the apiserver cannot review the token now; try again later\n".into(),
        }
    }

    async fn authenticate(&self, token: &str, now: Instant) -> Result<Option<User>, ReviewError> {
        let key = token_key(token);
        let cached = lock(&self.tokens).get(&key, now);
        if let Some(user) = self.counted("token", cached) {
            return Ok(user);
        }
        let user = self.reviewer.authenticate(token).await?;
        let ttl = if user.is_some() {
            LIFETIMES.yes
        } else {
            LIFETIMES.no
        };
        lock(&self.tokens).insert(key, user.clone(), now, ttl);
        Ok(user)
    }

    async fn authorize(&self, user: &User, path: &str, now: Instant) -> Result<bool, ReviewError> {
        let key = (user.clone(), path.to_string());
        let cached = lock(&self.paths).get(&key, now);
        if let Some(allowed) = self.counted("access", cached) {
            return Ok(allowed);
        }
        let allowed = self.reviewer.authorize(user, path).await?;
        let ttl = if allowed { LIFETIMES.yes } else { LIFETIMES.no };
        lock(&self.paths).insert(key, allowed, now, ttl);
        Ok(allowed)
    }

    fn counted<V>(&self, review: &'static str, cached: Option<V>) -> Option<V> {
        let result = if cached.is_some() { "hit" } else { "miss" };
        self.metrics
            .cache
            .get_or_create(&CacheLabels { review, result })
            .inc();
        cached
    }
}

/// A poisoned cache is still a valid cache (every insert is one call).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn token_key(token: &str) -> TokenKey {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// The token of `Bearer <token>` (the scheme in any case, RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// 127.0.0.0/8 and ::1, also as an IPv4-mapped address on a `::` socket.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `router` behind the access checks (the fallback too: an unknown path
/// tells a remote client nothing either).
pub fn guarded(router: Router, access: Arc<Access>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(access, guard))
}

async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    // Set by `serve` on every request; without it the client is unknown,
    // and an unknown client is a remote one.
    let Some(peer) = request.extensions().get::<Peer>().copied() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no peer address\n").into_response();
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let verdict = access
        .check_at(peer, request.uri().path(), authorization, Instant::now())
        .await;
    match verdict {
        Verdict::Pass => next.run(request).await,
        Verdict::Refused { why, message } => {
            access
                .metrics
                .refused
                .get_or_create(&RefusedLabels {
                    reason: why.metric_label(),
                })
                .inc();
            // Debug, not warn: on a public address scanners knock all day.
            tracing::debug!(peer = %peer.addr, path = request.uri().path(), reason = why.metric_label(), "request refused");
            let mut response = (
                why.status(),
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                message,
            )
                .into_response();
            if why.status() == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"podnat-controller\""),
                );
            }
            response
        }
    }
}

#[cfg(test)]
mod tests;
