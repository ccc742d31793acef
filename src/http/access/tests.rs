//! The verdicts without an apiserver: a reviewer that knows two tokens and
//! counts its calls stands in for it (the real one is tested against a
//! kube-apiserver in tests/http_auth.rs).

use super::*;
use crate::http::review::CountingReviewer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Knows the tokens "reader" and "nobody"; "reader" may get anything but
/// /secret; fails every TokenReview while `down` is set.
fn reviewer(down: Arc<AtomicBool>) -> Arc<CountingReviewer> {
    Arc::new(CountingReviewer::new(
        move |token| {
            if down.load(Ordering::Relaxed) {
                return Err(ReviewError::Timeout {
                    review: "TokenReview",
                });
            }
            Ok(["reader", "nobody"]
                .contains(&token)
                .then(|| User::named(token)))
        },
        |user, path| Ok(user.name == "reader" && path != "/secret"),
    ))
}

fn peer(ip: &str, tls: bool) -> Peer {
    Peer {
        addr: SocketAddr::new(ip.parse().unwrap(), 40000),
        tls,
    }
}

fn refusal(v: Verdict) -> Option<Refusal> {
    match v {
        Verdict::Pass => None,
        Verdict::Refused { why, .. } => Some(why),
    }
}

#[tokio::test]
async fn probes_and_loopback_are_open_remote_readers_need_an_allowed_token() {
    let reviewer = reviewer(Arc::default());
    let access = Access::new(reviewer.clone());
    let now = Instant::now();
    let check = |p, path, auth| {
        let access = &access;
        async move { refusal(access.check_at(p, path, auth, now).await) }
    };
    let remote = peer("203.0.113.1", true);
    for path in OPEN_PATHS {
        assert_eq!(check(peer("203.0.113.1", false), path, None).await, None);
    }
    for ip in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
        assert_eq!(check(peer(ip, false), "/metrics", None).await, None, "{ip}");
    }
    let plain = check(
        peer("203.0.113.1", false),
        "/metrics",
        Some("Bearer reader"),
    );
    assert_eq!(plain.await, Some(Refusal::PlainHttp));
    let v4_mapped = check(peer("::ffff:203.0.113.1", false), "/metrics", None);
    assert_eq!(v4_mapped.await, Some(Refusal::PlainHttp));
    assert_eq!(
        check(remote, "/metrics", None).await,
        Some(Refusal::NoToken)
    );
    let basic = check(remote, "/metrics", Some("Basic cmVhZGVy"));
    assert_eq!(basic.await, Some(Refusal::NoToken));
    let bad = check(remote, "/metrics", Some("Bearer forged"));
    assert_eq!(bad.await, Some(Refusal::InvalidToken));
    let denied = check(remote, "/entries/list", Some("Bearer nobody"));
    assert_eq!(denied.await, Some(Refusal::Forbidden));
    assert_eq!(
        check(remote, "/secret", Some("bearer  reader ")).await,
        Some(Refusal::Forbidden)
    );
    assert_eq!(check(remote, "/metrics", Some("Bearer reader")).await, None);
    assert_eq!(
        check(remote, "/entries/list", Some("Bearer reader")).await,
        None
    );
    // No review for open paths, loopback, plain HTTP or a missing token.
    assert_eq!(reviewer.token_reviews(), 3, "forged, nobody, reader");
    let status = |r: Refusal| r.status().as_u16();
    assert_eq!(status(Refusal::NoToken), 401);
    assert_eq!(status(Refusal::Forbidden), 403);
    assert_eq!(status(Refusal::ReviewFailed), 503);
}

#[tokio::test]
async fn reviews_are_reused_within_their_lifetime_and_never_when_they_fail() {
    let down = Arc::new(AtomicBool::new(false));
    let reviewer = reviewer(down.clone());
    let access = Access::new(reviewer.clone());
    let t0 = Instant::now();
    let remote = peer("203.0.113.1", true);
    let at = |secs: u64, token: &'static str| {
        let access = &access;
        async move {
            let now = t0 + Duration::from_secs(secs);
            refusal(access.check_at(remote, "/metrics", Some(token), now).await)
        }
    };
    // A scrape every 15 s: reviewed once per lifetime.
    for i in 0..8 {
        assert_eq!(at(i * 15, "Bearer reader").await, None);
    }
    assert_eq!(reviewer.token_reviews(), 1);
    assert_eq!(reviewer.access_reviews(), 1);
    assert_eq!(at(LIFETIMES.yes.as_secs(), "Bearer reader").await, None);
    assert_eq!(reviewer.token_reviews(), 2, "expired");
    assert_eq!(access.metrics.cache_count("token", "hit"), 7);
    assert_eq!(access.metrics.cache_count("token", "miss"), 2);

    // A bad token is remembered for the shorter lifetime.
    let before = reviewer.token_reviews();
    assert_eq!(at(200, "Bearer forged").await, Some(Refusal::InvalidToken));
    assert_eq!(at(205, "Bearer forged").await, Some(Refusal::InvalidToken));
    assert_eq!(reviewer.token_reviews(), before + 1);
    assert_eq!(
        at(200 + LIFETIMES.no.as_secs(), "Bearer forged").await,
        Some(Refusal::InvalidToken)
    );
    assert_eq!(reviewer.token_reviews(), before + 2);

    // The apiserver away: 503 for an unknown token, every time (never cached,
    // never open); a token reviewed before keeps working for its lifetime.
    down.store(true, Ordering::Relaxed);
    assert_eq!(at(300, "Bearer nobody").await, Some(Refusal::ReviewFailed));
    assert_eq!(at(301, "Bearer nobody").await, Some(Refusal::ReviewFailed));
    assert_eq!(
        at(302, "Bearer reader").await,
        Some(Refusal::ReviewFailed),
        "expired at 240"
    );
    down.store(false, Ordering::Relaxed);
    assert_eq!(at(303, "Bearer nobody").await, Some(Refusal::Forbidden));
}

#[test]
fn bearer_tokens_are_read_as_rfc_7235_says() {
    assert_eq!(bearer("Bearer abc"), Some("abc"));
    assert_eq!(bearer("bearer abc"), Some("abc"));
    assert_eq!(bearer("Bearer "), None);
    assert_eq!(bearer("Bearer"), None);
    assert_eq!(bearer("Token abc"), None);
}
