//! The state store: a per-node record of the NAT table (`state.json`, the Go
//! version's schema) that survives restarts and that other tools can read.
//! It is a record, not an input: the kernel and the API stay the source of
//! truth, and what is read at start only carries `Created` times forward.
//!
//! One trait, [`StateStore`], with three flavors: a ConfigMap
//! ([`configmap`]), a file on a WebDAV server ([`webdav`]) and [`NoStore`].
//! The [`Recorder`] runs the store on a task of its own: the loop hands it the
//! latest table through a watch channel and never waits for it, so a slow or
//! unreachable store never delays NAT. It writes only when the table's rules
//! change, retries with backoff, and counts failures in [`StateStats`].

pub mod configmap;
pub mod format;
pub mod webdav;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::StateFlavor;
use crate::model::Mapping;
pub use format::{NatRecord, StateFile, Summary};

/// Errors at the state store boundary. None of them stops the agent.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("ConfigMap {namespace}/{name}: {}", causes(.source))]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: ::kube::Error,
    },
    #[error("WebDAV {method} {url}: {}", causes(.source))]
    Http {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("WebDAV {method} {url}: the server answered {status}")]
    Status {
        method: &'static str,
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("cannot build the WebDAV client for {uri}: {}", causes(.source))]
    Client {
        uri: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("state URI {uri:?}: {reason} (pass -stateuri http://HOST[:PORT][/PATH])")]
    Uri { uri: String, reason: String },
    #[error("{what} at {location} took longer than {after:?}")]
    Timeout {
        what: &'static str,
        location: String,
        after: Duration,
    },
}

/// An error and its causes in one line: HTTP clients put the useful part
/// ("Connection refused") in a source that `Display` alone leaves out.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = cause.source();
    }
    text
}

impl StateError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StateError::Kube { .. } => "kube",
            StateError::Http { .. } => "http",
            StateError::Status { .. } => "http_status",
            StateError::Client { .. } => "client",
            StateError::Uri { .. } => "uri",
            StateError::Timeout { .. } => "timeout",
        }
    }
}

/// Where a node's `state.json` lives. A store moves text; parsing, change
/// detection and retries are the recorder's.
pub trait StateStore: Send + Sync {
    /// The flavor, as `-stateflavor` spells it.
    fn flavor(&self) -> &'static str;

    /// Where the record is, for logs (`ConfigMap ns/name key state.json`, a URL).
    fn location(&self) -> String;

    /// The stored text; `None` when there is no record yet.
    fn load(&self) -> BoxFuture<'_, Result<Option<String>, StateError>>;

    /// Replaces the stored text (creating the record if needed).
    fn save<'a>(&'a self, json: &'a str) -> BoxFuture<'a, Result<(), StateError>>;
}

/// `-stateflavor=none`: nothing is read or written. A store all the same, so
/// the agent's wiring has no special case.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoStore;

impl StateStore for NoStore {
    fn flavor(&self) -> &'static str {
        "none"
    }

    fn location(&self) -> String {
        "nowhere (-stateflavor=none)".into()
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<String>, StateError>> {
        Box::pin(async { Ok(None) })
    }

    fn save<'a>(&'a self, _json: &'a str) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The store for `-stateflavor`: a ConfigMap in the agent's namespace (see
/// [`configmap::agent_namespace`]), `<uri>/<node>/state.json` on a WebDAV
/// server, or none. `node_id` may be a full name; the record is named after
/// its first label, as the Go version named it.
pub fn store_for(
    flavor: StateFlavor,
    uri: &str,
    node_id: &str,
    client: &::kube::Client,
) -> Result<Box<dyn StateStore>, StateError> {
    Ok(match flavor {
        StateFlavor::Configmap => {
            let (namespace, source) = configmap::agent_namespace(
                |k| std::env::var(k).ok(),
                std::path::Path::new(configmap::SERVICE_ACCOUNT_NAMESPACE),
            );
            tracing::debug!(namespace, source, "state ConfigMap namespace");
            Box::new(configmap::ConfigMapStore::new(
                client.clone(),
                namespace,
                node_id,
            ))
        }
        StateFlavor::Webdav => Box::new(webdav::WebDavStore::new(uri, node_id)?),
        StateFlavor::None => Box::new(NoStore),
    })
}

/// Recorder settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecorderOptions {
    /// First wait after a failure; doubles per failure...
    pub retry_min: Duration,
    /// ...up to this.
    pub retry_max: Duration,
    /// Longest one load or save may take before it counts as failed.
    pub timeout: Duration,
}

impl Default for RecorderOptions {
    fn default() -> Self {
        RecorderOptions {
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
        }
    }
}

/// What the store did since start, for health, diagnostics and metrics.
/// Shared: the recorder writes, readers load.
#[derive(Debug)]
pub struct StateStats {
    flavor: &'static str,
    location: String,
    /// Records written.
    pub writes: AtomicU64,
    /// Failed writes (every attempt counts).
    pub write_errors: AtomicU64,
    /// Failed reads (every attempt counts).
    pub read_errors: AtomicU64,
    /// Records found that were not the expected JSON (replaced by the next write).
    pub malformed: AtomicU64,
    /// Tables handed over whose rules the record already held: no write.
    pub unchanged: AtomicU64,
    pending: AtomicBool,
    last_error: Mutex<Option<String>>,
    last_write: Mutex<Option<SystemTime>>,
}

impl StateStats {
    fn new(flavor: &'static str, location: String) -> StateStats {
        StateStats {
            flavor,
            location,
            writes: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            unchanged: AtomicU64::new(0),
            pending: AtomicBool::new(false),
            last_error: Mutex::new(None),
            last_write: Mutex::new(None),
        }
    }

    /// `configmap`, `webdav` or `none`.
    pub fn flavor(&self) -> &'static str {
        self.flavor
    }

    /// Where the record is.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Failed reads and writes since start (each retry counts).
    pub fn failures(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed) + self.read_errors.load(Ordering::Relaxed)
    }

    /// The last failure's message, cleared by the next successful write.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    pub fn last_write(&self) -> Option<SystemTime> {
        *lock(&self.last_write)
    }

    /// A changed table waits to be written (the store is failing or busy).
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    fn failed(&self, counter: &AtomicU64, e: &StateError) {
        counter.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(e.to_string());
    }
}

/// A poisoned lock only means a reader panicked mid-clone; the data is whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The loop's end of the store: hands over the table the kernel holds.
/// Never waits: the recorder task picks up the latest table when it can.
#[derive(Debug)]
pub struct Recorder {
    tx: watch::Sender<Option<Vec<Mapping>>>,
}

impl Recorder {
    /// The kernel now holds these DNAT mappings (sorted, as in `RuleSet`).
    /// The SNAT and FORWARD rules follow from them, so they are the record.
    pub fn record(&self, dnat: &[Mapping]) {
        self.tx.send_if_modified(|current| {
            if current.as_deref() == Some(dnat) {
                return false;
            }
            *current = Some(dnat.to_vec());
            true
        });
    }

    /// The kernel's DNAT mappings changed by these (after a `record` of the
    /// whole table): O(change), nothing is copied but the changes.
    pub fn record_changes(&self, added: &[Mapping], removed: &[Mapping]) {
        if added.is_empty() && removed.is_empty() {
            return;
        }
        self.tx.send_if_modified(|current| {
            let Some(v) = current.as_mut() else {
                return false;
            };
            for m in removed {
                if let Ok(i) = v.binary_search(m) {
                    v.remove(i);
                }
            }
            for m in added {
                if let Err(i) = v.binary_search(m) {
                    v.insert(i, m.clone());
                }
            }
            true
        });
    }
}

/// Starts the recorder task for `store`: it reads the record once (and logs
/// what it found), then writes each changed table. The task ends when the
/// [`Recorder`] is dropped and nothing is left to write.
pub fn spawn(
    store: Box<dyn StateStore>,
    options: RecorderOptions,
) -> (Recorder, Arc<StateStats>, JoinHandle<()>) {
    let stats = Arc::new(StateStats::new(store.flavor(), store.location()));
    let (tx, rx) = watch::channel(None);
    let writer = Writer {
        store,
        options,
        stats: stats.clone(),
        loaded: false,
        stored: None,
    };
    let task = tokio::spawn(writer.run(rx));
    (Recorder { tx }, stats, task)
}

/// The recorder task's state.
struct Writer {
    store: Box<dyn StateStore>,
    options: RecorderOptions,
    stats: Arc<StateStats>,
    /// The record was read (found, absent or malformed). Until then every
    /// write attempt reads first, so a store that is down at start does not
    /// lose the `Created` times it holds.
    loaded: bool,
    /// What the store holds, as far as we know; `None`: nothing usable
    /// (absent, malformed, unknown), so the next table is written whatever it
    /// is. Also where `Created` times come from.
    stored: Option<Summary>,
}

impl Writer {
    async fn run(mut self, mut rx: watch::Receiver<Option<Vec<Mapping>>>) {
        tracing::info!(
            flavor = self.store.flavor(),
            location = %self.store.location(),
            "state store"
        );
        if let Err(e) = self.load().await {
            tracing::warn!(error = %e, "cannot read the state record; trying again before the first write");
        }
        loop {
            if rx.changed().await.is_err() {
                return;
            }
            let Some(mut dnat) = rx.borrow_and_update().clone() else {
                continue;
            };
            self.stats.pending.store(true, Ordering::Release);
            let mut delay = self.options.retry_min;
            let mut failures = 0u32;
            loop {
                match self.attempt(&dnat).await {
                    Ok(written) => {
                        if written && failures > 0 {
                            tracing::info!(
                                failures,
                                location = %self.store.location(),
                                "state record written after failed attempts"
                            );
                        }
                        break;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::error!(
                            error = %e,
                            retry_in = ?delay,
                            "cannot write the state record; NAT is not affected, retrying"
                        );
                        tokio::time::sleep(delay).await;
                        delay = delay.saturating_mul(2).min(self.options.retry_max);
                        // Retry with the latest table, not the one that failed.
                        match rx.has_changed() {
                            Ok(true) => {
                                if let Some(latest) = rx.borrow_and_update().clone() {
                                    dnat = latest;
                                }
                            }
                            Ok(false) => {}
                            Err(_) => {
                                tracing::warn!("stopping with the latest table not recorded");
                                return;
                            }
                        }
                    }
                }
            }
            self.stats.pending.store(false, Ordering::Release);
        }
    }

    /// Reads the record once; absent or malformed counts as read.
    async fn load(&mut self) -> Result<(), StateError> {
        let location = self.store.location();
        let text = match self
            .timed("reading the state record", self.store.load())
            .await
        {
            Ok(text) => text,
            Err(e) => {
                self.stats.failed(&self.stats.read_errors, &e);
                return Err(e);
            }
        };
        self.loaded = true;
        let Some(text) = text else {
            tracing::info!(%location, "no state record yet; it is created at the first write");
            return Ok(());
        };
        match StateFile::parse(&text) {
            Ok(file) => {
                let pods: std::collections::BTreeSet<&str> =
                    file.records().map(|r| r.comment.as_str()).collect();
                tracing::info!(
                    %location,
                    rules = file.len(),
                    pods = pods.len(),
                    last_written = ?file.last_verified().map(|t| t.to_string()),
                    "state record found (a record only: the kernel and the API decide what is programmed)"
                );
                for r in file.records() {
                    tracing::debug!(rule = %r.id(), created = %r.created, "recorded rule");
                }
                self.stored = Some(Summary::of(&file));
            }
            Err(e) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    %location,
                    error = %e,
                    bytes = text.len(),
                    "the state record is not the expected JSON; it is replaced at the next write"
                );
            }
        }
        Ok(())
    }

    /// One try at recording `dnat`: `Ok(false)` when the store already holds
    /// these rules.
    async fn attempt(&mut self, dnat: &[Mapping]) -> Result<bool, StateError> {
        if !self.loaded {
            self.load().await?;
        }
        let none = Summary::default();
        let previous = self.stored.as_ref().unwrap_or(&none);
        let file = StateFile::with_times(dnat, previous, Timestamp::now());
        if self.stored.as_ref().is_some_and(|s| s.same_rules(&file)) {
            self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(rules = file.len(), "state record already holds this table");
            return Ok(false);
        }
        let json = file.to_json();
        if let Err(e) = self
            .timed("writing the state record", self.store.save(&json))
            .await
        {
            self.stats.failed(&self.stats.write_errors, &e);
            return Err(e);
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        *lock(&self.stats.last_write) = Some(SystemTime::now());
        *lock(&self.stats.last_error) = None;
        tracing::debug!(
            rules = file.len(),
            bytes = json.len(),
            location = %self.store.location(),
            "state record written"
        );
        self.stored = Some(Summary::of(&file));
        Ok(true)
    }

    async fn timed<T>(
        &self,
        what: &'static str,
        f: BoxFuture<'_, Result<T, StateError>>,
    ) -> Result<T, StateError> {
        tokio::time::timeout(self.options.timeout, f)
            .await
            .unwrap_or_else(|_| {
                Err(StateError::Timeout {
                    what,
                    location: self.store.location(),
                    after: self.options.timeout,
                })
            })
    }
}

#[cfg(test)]
mod tests;
