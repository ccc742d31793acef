//! What the review cache saves the apiserver: one simulated hour of
//! Prometheus scraping a node's agent every 15 s over TLS with a bearer
//! token, through the agent's own access checks and cache
//! (`http::access::Access`), against a reviewer that counts the
//! TokenReviews and SubjectAccessReviews it would send. The clock is
//! simulated (the cache takes `now`), so the hour takes milliseconds.
//!
//! Prints figures; asserts nothing: `cargo bench --bench http_auth`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podnat_controller::http::access::{Access, Peer, Verdict};
use podnat_controller::http::review::{CountingReviewer, User};
use podnat_controller::http::REVIEW_LIFETIMES;

const HOUR: Duration = Duration::from_secs(3600);
const SCRAPE_EVERY: Duration = Duration::from_secs(15);

/// Tokens here are `<owner>#<generation>`.
fn token_owner(token: &str) -> &str {
    token.split('#').next().unwrap_or(token)
}

struct Scenario {
    name: &'static str,
    /// Prometheus replicas, each with its own service account.
    scrapers: usize,
    paths: &'static [&'static str],
    /// The kubelet renews a projected token at 80% of its lifetime (48 min
    /// of the default hour); Prometheus then sends the new one.
    rotate_every: Option<Duration>,
}

fn run(scenario: &Scenario, rt: &tokio::runtime::Runtime) {
    // Allows every token (its owner is the user) and every path.
    let reviewer = Arc::new(CountingReviewer::new(
        |token| Ok(Some(User::named(token_owner(token)))),
        |_, _| Ok(true),
    ));
    let access = Access::new(reviewer.clone());
    let t0 = Instant::now();
    let mut requests = 0u64;
    let mut at = Duration::ZERO;
    while at < HOUR {
        for scraper in 0..scenario.scrapers {
            let generation = scenario
                .rotate_every
                .map_or(0, |r| at.as_secs() / r.as_secs());
            let token = format!("Bearer prometheus-{scraper}#{generation}");
            let peer = Peer {
                addr: SocketAddr::from(([198, 51, 100, 10 + scraper as u8], 40000)),
                tls: true,
            };
            for path in scenario.paths {
                let verdict = rt.block_on(access.check_at(peer, path, Some(&token), t0 + at));
                assert_eq!(verdict, Verdict::Pass, "the counting reviewer allows all");
                requests += 1;
            }
        }
        at += SCRAPE_EVERY;
    }
    let (token, sar) = (reviewer.token_reviews(), reviewer.access_reviews());
    let hits =
        access.metrics.cache_count("token", "hit") + access.metrics.cache_count("access", "hit");
    let lookups = hits + token + sar;
    println!(
        "{:<48} {:>8} {:>12} {:>12} {:>9.1}%",
        scenario.name,
        requests,
        token,
        sar,
        100.0 * hits as f64 / lookups.max(1) as f64
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    println!(
        "review cache: answers kept {}s (valid token, allowed path), {}s (invalid, denied); one hour, a scrape every {}s",
        REVIEW_LIFETIMES.yes.as_secs(),
        REVIEW_LIFETIMES.no.as_secs(),
        SCRAPE_EVERY.as_secs()
    );
    println!(
        "{:<48} {:>8} {:>12} {:>12} {:>10}",
        "scenario", "requests", "TokenReview", "SubjectAR", "hit rate"
    );
    for scenario in [
        Scenario {
            name: "one Prometheus, /metrics",
            scrapers: 1,
            paths: &["/metrics"],
            rotate_every: None,
        },
        Scenario {
            name: "HA pair, /metrics + /entries/list",
            scrapers: 2,
            paths: &["/metrics", "/entries/list"],
            rotate_every: None,
        },
        Scenario {
            name: "one Prometheus, /metrics, token renewed at 48m",
            scrapers: 1,
            paths: &["/metrics"],
            rotate_every: Some(Duration::from_secs(48 * 60)),
        },
    ] {
        run(&scenario, &rt);
    }
}
