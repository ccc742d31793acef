use super::*;
use crate::model::{NatKey, PodRef, Proto};
use std::net::Ipv4Addr;

/// An in-memory store that can be told to fail: the recorder's logic
/// (change detection, retries, reading before the first write) without a
/// server. The real stores are exercised in tests/state.rs.
#[derive(Default)]
struct MemoryStore {
    text: Mutex<Option<String>>,
    down: AtomicBool,
    saves: AtomicU64,
}

impl StateStore for Arc<MemoryStore> {
    fn flavor(&self) -> &'static str {
        "memory"
    }
    fn location(&self) -> String {
        "memory".into()
    }
    fn load(&self) -> BoxFuture<'_, Result<Option<String>, StateError>> {
        Box::pin(async {
            if self.down.load(Ordering::SeqCst) {
                return Err(self.error());
            }
            Ok(lock(&self.text).clone())
        })
    }
    fn save<'a>(&'a self, json: &'a str) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            if self.down.load(Ordering::SeqCst) {
                return Err(self.error());
            }
            self.saves.fetch_add(1, Ordering::SeqCst);
            *lock(&self.text) = Some(json.to_string());
            Ok(())
        })
    }
}

impl MemoryStore {
    fn error(&self) -> StateError {
        StateError::Uri {
            uri: "memory".into(),
            reason: "down".into(),
        }
    }
    fn file(&self) -> StateFile {
        StateFile::parse(lock(&self.text).as_deref().unwrap_or("{}")).unwrap()
    }
}

fn mapping(port: u16) -> Mapping {
    Mapping {
        key: NatKey {
            public_ip: Ipv4Addr::new(203, 0, 113, 7).into(),
            public_port: port,
            proto: Proto::Tcp,
        },
        pod_ip: Ipv4Addr::new(10, 1, 0, 5).into(),
        pod_port: port,
        owner: PodRef::new("mail", "mx"),
        span: 0,
    }
}

fn fast() -> RecorderOptions {
    RecorderOptions {
        retry_min: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        timeout: Duration::from_secs(5),
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn writes_on_change_only_and_keeps_created_across_restarts() {
    let mem = Arc::new(MemoryStore::default());
    let (rec, stats, task) = spawn(Box::new(mem.clone()), fast());
    rec.record(&[mapping(25)]);
    until("first write", || stats.writes.load(Ordering::SeqCst) == 1).await;
    let created = mem.file().records().next().unwrap().created;

    // The same table again (a resync): no wake-up, no write.
    rec.record(&[mapping(25)]);
    rec.record(&[mapping(25), mapping(587)]);
    until("second write", || stats.writes.load(Ordering::SeqCst) == 2).await;
    assert_eq!(mem.file().len(), 2);
    drop(rec);
    task.await.unwrap();

    // A restarted agent with the same table writes nothing.
    let (rec, stats, task) = spawn(Box::new(mem.clone()), fast());
    rec.record(&[mapping(25), mapping(587)]);
    until("the table compared", || {
        stats.unchanged.load(Ordering::SeqCst) == 1
    })
    .await;
    // One that drops a rule writes, and the rule that stays keeps Created.
    rec.record(&[mapping(25)]);
    until("a write", || stats.writes.load(Ordering::SeqCst) == 1).await;
    assert_eq!(mem.saves.load(Ordering::SeqCst), 3);
    assert_eq!(mem.file().records().next().unwrap().created, created);
    drop(rec);
    task.await.unwrap();
}

#[tokio::test]
async fn a_store_down_at_start_is_read_before_the_first_write() {
    let mem = Arc::new(MemoryStore::default());
    let old = StateFile::from_mappings(
        &[mapping(25)],
        &StateFile::default(),
        "2020-01-01T00:00:00Z".parse().unwrap(),
    );
    *lock(&mem.text) = Some(old.to_json());
    mem.down.store(true, Ordering::SeqCst);
    let (rec, stats, _task) = spawn(Box::new(mem.clone()), fast());
    rec.record(&[mapping(25), mapping(26)]);
    until("failures counted", || stats.failures() >= 3).await;
    assert!(stats.pending());
    assert!(stats.last_error().is_some());
    // A newer table while failing: the retry writes the newest.
    rec.record(&[mapping(25), mapping(27)]);
    mem.down.store(false, Ordering::SeqCst);
    until("the write", || stats.writes.load(Ordering::SeqCst) == 1).await;
    until("not pending", || !stats.pending()).await;
    let file = mem.file();
    assert_eq!(file.mappings(), vec![mapping(25), mapping(27)]);
    assert_eq!(
        file.entries["203.0.113.7:25"][0].created,
        old.entries["203.0.113.7:25"][0].created
    );
    assert_eq!(stats.last_error(), None);
}

#[tokio::test]
async fn a_malformed_record_is_replaced_even_by_an_empty_table() {
    let mem = Arc::new(MemoryStore::default());
    *lock(&mem.text) = Some("{not json".into());
    let (rec, stats, _task) = spawn(Box::new(mem.clone()), fast());
    rec.record(&[]);
    until("the write", || stats.writes.load(Ordering::SeqCst) == 1).await;
    assert_eq!(stats.malformed.load(Ordering::SeqCst), 1);
    assert_eq!(lock(&mem.text).as_deref(), Some("{}"));
}
