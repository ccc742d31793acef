//! The state store (issue 8) against the real things: ConfigMaps on the test
//! kube-apiserver as the agent identity with only the RBAC of
//! tests/fixtures/rbac.yaml, `state.json` files on Apache httpd with mod_dav
//! (Debian's apache2-bin, installed by scripts/install-deps) started by the
//! test on 127.0.0.1, and the agent binary whose WebDAV store is down at
//! start. Plus the Go version's format through tests/fixtures/state-go.json.
//! Every wait polls with a deadline; nothing asserts on timing.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::{annotation, wait_for, Agent, EchoServer, World, NODE, WAIT};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use podnat_controller::model::{Mapping, NatKey, PodRef, Proto};
use podnat_controller::state::configmap::ConfigMapStore;
use podnat_controller::state::webdav::WebDavStore;
use podnat_controller::state::{
    self, RecorderOptions, StateError, StateFile, StateStats, StateStore,
};
use support::netns::{Netns, POD_A_IP};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/state-go.json");

fn mapping(port: u16, pod_ip: [u8; 4], owner: &str) -> Mapping {
    Mapping {
        key: NatKey {
            public_ip: Ipv4Addr::new(203, 0, 113, 7).into(),
            public_port: port,
            proto: Proto::Tcp,
        },
        pod_ip: pod_ip.into(),
        pod_port: port,
        owner: PodRef::from_comment(owner).expect("namespace:pod"),
        span: 0,
    }
}

/// Short waits between retries, so a test does not sit out a 30 s backoff.
fn fast() -> RecorderOptions {
    RecorderOptions {
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
        timeout: Duration::from_secs(10),
    }
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

fn created_of(file: &StateFile) -> Vec<(String, Timestamp)> {
    file.records()
        .map(|r| (r.id().to_string(), r.created))
        .collect()
}

/// The `Created` the agent writes for a rule of `go`: its own, except that a
/// UDP rule sharing its `ip:port` key with a TCP one is written at least a
/// second before the TCP rule's (so a rolled-back Go version keeps TCP).
fn written_created(go: &StateFile) -> Vec<(String, Timestamp)> {
    let second = k8s_openapi::jiff::SignedDuration::from_secs(1);
    go.entries
        .values()
        .flat_map(|list| {
            let tcp = list
                .iter()
                .find(|r| r.protocol == Proto::Tcp)
                .map(|t| t.created);
            list.iter().map(move |r| {
                let created = match tcp {
                    Some(t) if r.protocol == Proto::Udp => {
                        r.created.min(t.checked_sub(second).unwrap())
                    }
                    _ => r.created,
                };
                (r.id().to_string(), created)
            })
        })
        .collect()
}

// ---------------------------------------------------------------- Go format

#[test]
fn go_fixture_round_trip_keeps_created() {
    let text = std::fs::read_to_string(FIXTURE).expect("read the fixture");
    let go = StateFile::parse(&text).expect("the Go version's state.json parses");
    assert_eq!(go.len(), 10);
    assert_eq!(
        go.entries["203.0.113.7:443"].len(),
        2,
        "TCP and UDP share a key"
    );
    // An offset in the file is the same instant in UTC.
    let backup = &go.entries["198.51.100.20:25"][0];
    assert_eq!(
        backup.created,
        "2024-10-28T16:02:11.305566031Z"
            .parse::<Timestamp>()
            .unwrap()
    );

    // parse → serialize → parse is the identity.
    let again = StateFile::parse(&go.to_json()).expect("our output parses");
    assert_eq!(again, go);

    // What we write is what the Go version reads: addresses as net.IPAddr
    // objects, every field it declares, RFC 3339 times.
    let value: serde_json::Value = serde_json::from_str(&go.to_json()).unwrap();
    for (key, list) in value.as_object().unwrap() {
        for rule in list.as_array().unwrap() {
            for field in ["SourceIP", "DestinationIP"] {
                assert!(
                    rule[field]["IP"].is_string(),
                    "{key}: {field} = {}",
                    rule[field]
                );
                assert_eq!(rule[field]["Zone"], "", "{key}");
            }
            // Every field the Go version declares (serde_json's map sorts keys;
            // the field order of the text is checked in src/state/format.rs).
            let fields: Vec<&str> = rule
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.as_str())
                .collect();
            assert_eq!(
                fields,
                [
                    "Comment",
                    "Created",
                    "DestinationIP",
                    "DestinationPort",
                    "LastVerified",
                    "Protocol",
                    "SourceIP",
                    "SourcePort"
                ]
            );
        }
    }

    // Through the planner's model and back: the same rules, each keeping its
    // Created, every LastVerified moved to the write.
    let mappings = go.mappings();
    assert_eq!(mappings.len(), 10);
    assert!(mappings.contains(&Mapping {
        key: NatKey {
            public_ip: Ipv4Addr::new(198, 51, 100, 20).into(),
            public_port: 25,
            proto: Proto::Tcp
        },
        pod_ip: Ipv4Addr::new(10, 42, 1, 31).into(),
        pod_port: 2525,
        owner: PodRef::new("mail", "mx-backup-0"),
        span: 0,
    }));
    let now = Timestamp::now();
    let ours = StateFile::from_mappings(&mappings, &go, now);
    assert!(ours.same_rules(&go));
    let mut want = written_created(&go);
    want.sort();
    assert_ne!(
        want,
        {
            let mut c = created_of(&go);
            c.sort();
            c
        },
        "the fixture has a port on both protocols"
    );
    let mut got = created_of(&ours);
    got.sort();
    assert_eq!(got, want);
    assert!(ours.records().all(|r| r.last_verified == now));
    assert_eq!(StateFile::parse(&ours.to_json()).unwrap(), ours);

    // A rule that goes away is gone; the others keep their Created.
    let fewer: Vec<Mapping> = mappings
        .iter()
        .filter(|m| m.key.public_port != 80)
        .cloned()
        .collect();
    let later = StateFile::from_mappings(&fewer, &ours, Timestamp::now());
    assert_eq!(later.len(), 9);
    assert!(!later.entries.contains_key("203.0.113.7:80"));
    let written = written_created(&go);
    for r in later.records() {
        let before = written
            .iter()
            .find(|(id, _)| *id == r.id().to_string())
            .expect("was there");
        assert_eq!(r.created, before.1, "{}", r.id());
    }
}

// ---------------------------------------------------------------- ConfigMap

async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

/// RBAC changes reach the authorizer a moment after they are written, the
/// namespaced Role apart from the ClusterRole `World::new` waits for.
fn wait_configmap_rbac(w: &World) {
    wait_for("the agent's ConfigMap Role in the authorizer", WAIT, || {
        ["get", "create", "patch"]
            .iter()
            .all(|verb| w.agent_may(verb, "", "configmaps", "podnat-system"))
    });
}

/// `(resourceVersion, state.json)` of a ConfigMap, read as the admin.
fn read_configmap(w: &World, name: &str) -> Option<(String, String)> {
    let api: Api<ConfigMap> = Api::namespaced(w.admin.clone(), "podnat-system");
    let cm = w.rt.block_on(api.get_opt(name)).expect("get ConfigMap")?;
    Some((
        cm.metadata.resource_version.unwrap_or_default(),
        cm.data
            .and_then(|mut d| d.remove("state.json"))
            .unwrap_or_default(),
    ))
}

#[test]
fn configmap_store_as_the_agent_with_its_rbac_only() {
    let w = World::new("stcm");
    wait_configmap_rbac(&w);
    let agent = w.rt.block_on(client(&w.cluster.agent_kubeconfig));
    let store = ConfigMapStore::new(agent.clone(), "podnat-system", "node1.example.org");
    assert_eq!(store.name(), "podnat-controller-node1");
    assert_eq!(w.rt.block_on(store.load()).expect("get as the agent"), None);

    let a = mapping(25, [10, 1, 0, 5], "mail:mx-0");
    let b = mapping(587, [10, 1, 0, 5], "mail:mx-0");
    let _guard = w.rt.enter();
    let (rec, stats, task) = state::spawn(Box::new(store), fast());

    // Create.
    rec.record(&[a.clone(), b.clone()]);
    wait_for("the ConfigMap written", WAIT, || count(&stats.writes) == 1);
    let (rv1, text) = read_configmap(&w, "podnat-controller-node1").expect("created");
    let first = StateFile::parse(&text).expect("state.json parses");
    assert_eq!(first.mappings(), vec![a.clone(), b.clone()]);

    // The same table again (every resync hands it over): nothing is written.
    rec.record(&[a.clone(), b.clone()]);
    // Update on change: 587 goes, 25 stays with its Created.
    rec.record(std::slice::from_ref(&a));
    wait_for("the ConfigMap updated", WAIT, || count(&stats.writes) == 2);
    let (rv2, text) = read_configmap(&w, "podnat-controller-node1").expect("still there");
    assert_ne!(rv1, rv2);
    let second = StateFile::parse(&text).unwrap();
    assert_eq!(second.mappings(), vec![a.clone()]);
    assert_eq!(
        second.entries["203.0.113.7:25"][0].created,
        first.entries["203.0.113.7:25"][0].created
    );
    assert_eq!(count(&stats.write_errors) + count(&stats.read_errors), 0);
    drop(rec);
    w.rt.block_on(task).expect("recorder task");

    // A restarted agent reads the record back and, with the same table,
    // writes nothing: the ConfigMap keeps its resourceVersion.
    let store = ConfigMapStore::new(agent.clone(), "podnat-system", "node1");
    let back =
        w.rt.block_on(store.load())
            .expect("read back")
            .expect("a record");
    assert_eq!(StateFile::parse(&back).unwrap(), second);
    let (rec, stats, _task) = state::spawn(Box::new(store), fast());
    rec.record(std::slice::from_ref(&a));
    wait_for("the table compared with the record", WAIT, || {
        count(&stats.unchanged) == 1
    });
    assert_eq!(count(&stats.writes), 0);
    assert_eq!(
        read_configmap(&w, "podnat-controller-node1").unwrap().0,
        rv2
    );

    // The Role allows ConfigMaps in podnat-system only: elsewhere the write
    // fails, and the error says where and why.
    let outside = ConfigMapStore::new(agent.clone(), "default", "node1");
    let e = w.rt.block_on(outside.save("{}")).expect_err("forbidden");
    assert!(
        matches!(&e, StateError::Kube { source: kube::Error::Api(s), .. } if s.code == 403),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("default/podnat-controller-node1"),
        "{e}"
    );
}

#[test]
fn configmap_written_by_the_go_version_is_taken_over_keeping_created() {
    let w = World::new("stgo");
    wait_configmap_rbac(&w);
    // As the Go version left it: its own ConfigMap, written with Update.
    let go_text = std::fs::read_to_string(FIXTURE).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(w.admin.clone(), "podnat-system");
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "podnat-controller-node2"},
        "data": {"state.json": go_text},
    }))
    .unwrap();
    w.rt.block_on(api.create(&PostParams::default(), &cm))
        .expect("create the Go version's ConfigMap");
    let go = StateFile::parse(&go_text).unwrap();

    let agent = w.rt.block_on(client(&w.cluster.agent_kubeconfig));
    let store = ConfigMapStore::new(agent, "podnat-system", "node2.example.org");
    let _guard = w.rt.enter();
    let (rec, stats, _task) = state::spawn(Box::new(store), fast());
    // The pods still there keep their rules; the ingress pod is gone.
    let still: Vec<Mapping> = go
        .mappings()
        .into_iter()
        .filter(|m| &*m.owner.namespace != "ingress-nginx")
        .collect();
    assert_eq!(still.len(), 7);
    rec.record(&still);
    wait_for("the record rewritten", WAIT, || count(&stats.writes) == 1);
    let (_, text) = read_configmap(&w, "podnat-controller-node2").unwrap();
    let ours = StateFile::parse(&text).unwrap();
    assert_eq!(ours.mappings(), still);
    for r in ours.records() {
        let before = go.records().find(|g| g.id() == r.id()).expect("was there");
        assert_eq!(r.created, before.created, "{}", r.id());
        assert!(r.last_verified > before.last_verified);
    }
    assert_eq!(count(&stats.malformed), 0);
}

// ---------------------------------------------------------------- WebDAV

/// Apache httpd with mod_dav serving a fresh directory on 127.0.0.1:PORT,
/// in the host's namespace or in a test namespace. Stopped (SIGTERM, then
/// waited for) and its directory removed on drop.
struct DavServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

static DAV_SEQ: AtomicU32 = AtomicU32::new(0);

impl DavServer {
    /// Prepares the server for `port` without starting it.
    fn new(port: u16) -> DavServer {
        let apache = Path::new("/usr/sbin/apache2");
        assert!(
            apache.exists(),
            "{} is missing: run scripts/install-deps (Debian package apache2-bin)",
            apache.display()
        );
        let dir = std::env::temp_dir().join(format!(
            "podnat-dav-{}-{}",
            std::process::id(),
            DAV_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let root = dir.join("dav");
        let run = dir.join("run");
        std::fs::create_dir_all(&root).expect("dav dir");
        std::fs::create_dir_all(&run).expect("run dir");
        // Started as root, httpd serves as `nobody`, which must write here.
        for d in [&root, &run] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .expect("chmod");
        }
        let modules = "/usr/lib/apache2/modules";
        let conf = format!(
            r#"ServerRoot "{dir}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile "{run}/httpd.pid"
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule dav_module {modules}/mod_dav.so
LoadModule dav_fs_module {modules}/mod_dav_fs.so
User nobody
Group nogroup
ErrorLog "{dir}/error.log"
LogLevel warn
DavLockDB "{run}/davlock"
DocumentRoot "{root}"
<Directory "{root}">
  Dav On
  Require all granted
</Directory>
"#,
            dir = dir.display(),
            run = run.display(),
            root = root.display(),
        );
        std::fs::write(dir.join("httpd.conf"), conf).expect("httpd.conf");
        DavServer {
            dir,
            port,
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The record of `node` on the server's disk.
    fn file(&self, node: &str) -> PathBuf {
        self.dir.join("dav").join(node).join("state.json")
    }

    /// Starts httpd in the host's namespace (`ns: None`) or in `ns`, and
    /// waits until it accepts connections.
    fn start(&mut self, ns: Option<&Netns>) {
        let conf = self.dir.join("httpd.conf");
        let mut cmd = match ns {
            // `ip netns exec` execs httpd: the child is httpd itself.
            Some(ns) => ns.command("/usr/sbin/apache2"),
            None => Command::new("/usr/sbin/apache2"),
        };
        let log = File::create(self.dir.join("stdout.log")).expect("log");
        let child = cmd
            .arg("-f")
            .arg(&conf)
            .arg("-DFOREGROUND")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start apache2");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let connect = || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
        wait_for("httpd to accept connections", WAIT, || {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("httpd exited ({st}):\n{}", self.logs());
            }
            match ns {
                Some(ns) => ns.run(connect),
                None => connect(),
            }
        });
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("error.log"))
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM: httpd stops its workers too (SIGKILL would orphan them).
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        for _ in 0..200 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for DavServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("===== httpd logs =====\n{}", self.logs());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on at the moment, on 127.0.0.1 of this namespace.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn read_file(path: &Path) -> Option<StateFile> {
    let text = std::fs::read_to_string(path).ok()?;
    StateFile::parse(&text).ok()
}

#[test]
fn webdav_round_trip() {
    let mut dav = DavServer::new(free_port());
    dav.start(None);
    let rt = runtime();
    let _guard = rt.enter();
    let store = WebDavStore::new(&dav.url(), "node1.example.org").expect("store");
    assert_eq!(store.location(), format!("{}/node1/state.json", dav.url()));
    assert_eq!(rt.block_on(store.load()).expect("GET"), None);

    let a = mapping(25, [10, 1, 0, 5], "mail:mx-0");
    let b = mapping(443, [10, 1, 1, 5], "web:ingress-0");
    let (rec, stats, task) = state::spawn(Box::new(store), fast());
    rec.record(&[a.clone(), b.clone()]);
    wait_for("the first PUT", WAIT, || count(&stats.writes) == 1);
    // MKCOL made <uri>/node1/, PUT wrote state.json in it.
    let first = read_file(&dav.file("node1")).expect("state.json on the server's disk");
    assert_eq!(first.mappings(), vec![a.clone(), b.clone()]);

    rec.record(std::slice::from_ref(&b));
    wait_for("the second PUT", WAIT, || count(&stats.writes) == 2);
    let second = read_file(&dav.file("node1")).unwrap();
    assert_eq!(second.mappings(), vec![b.clone()]);
    assert_eq!(
        second.entries["203.0.113.7:443"][0].created,
        first.entries["203.0.113.7:443"][0].created
    );
    drop(rec);
    rt.block_on(task).unwrap();

    // GET reads back exactly what is on the server.
    let store = WebDavStore::new(&dav.url(), "node1").unwrap();
    let back = rt.block_on(store.load()).unwrap().expect("a record");
    assert_eq!(StateFile::parse(&back).unwrap(), second);
    // A restart with the same table writes nothing.
    let (rec, stats, _task) = state::spawn(Box::new(store), fast());
    rec.record(std::slice::from_ref(&b));
    wait_for("the table compared", WAIT, || count(&stats.unchanged) == 1);
    assert_eq!(count(&stats.writes), 0);
    assert_eq!(stats.failures(), 0);
}

#[test]
fn webdav_down_at_start_is_retried_until_written() {
    let mut dav = DavServer::new(free_port());
    let rt = runtime();
    let _guard = rt.enter();
    let store = WebDavStore::new(&dav.url(), "node1").unwrap();
    let (rec, stats, _task) = state::spawn(Box::new(store), fast());
    let a = mapping(25, [10, 1, 0, 5], "mail:mx-0");
    rec.record(std::slice::from_ref(&a));
    wait_for("failures counted", WAIT, || stats.failures() >= 3);
    assert!(stats.pending());
    // The cause is in the message, not only "error sending request".
    let error = stats.last_error().unwrap_or_default();
    assert!(
        error.contains("127.0.0.1") && error.contains("Connection refused"),
        "{error}"
    );
    // A newer table while the store is down: that one is written.
    let b = mapping(26, [10, 1, 0, 5], "mail:mx-0");
    rec.record(&[a.clone(), b.clone()]);
    dav.start(None);
    wait_for("the record written once the server is up", WAIT, || {
        count(&stats.writes) == 1
    });
    wait_for("nothing pending", WAIT, || !stats.pending());
    assert_eq!(
        read_file(&dav.file("node1")).unwrap().mappings(),
        vec![a, b]
    );
    assert_eq!(stats.last_error(), None);
}

#[test]
fn webdav_malformed_record_is_logged_and_replaced() {
    let mut dav = DavServer::new(free_port());
    dav.start(None);
    let rt = runtime();
    let _guard = rt.enter();
    let store = WebDavStore::new(&dav.url(), "node1").unwrap();
    // Someone left garbage at the agent's place on the server.
    rt.block_on(store.save(r#"{"203.0.113.7:25": [{"Protocol": "tcp", "SourceIP""#))
        .expect("PUT garbage");
    let (rec, stats, task): (_, Arc<StateStats>, _) = state::spawn(Box::new(store), fast());
    wait_for("the record read", WAIT, || count(&stats.malformed) == 1);
    // Even an empty table replaces it (the record must be readable again).
    rec.record(&[]);
    wait_for("the record replaced", WAIT, || count(&stats.writes) == 1);
    assert_eq!(std::fs::read_to_string(dav.file("node1")).unwrap(), "{}");
    let a = mapping(25, [10, 1, 0, 5], "mail:mx-0");
    rec.record(std::slice::from_ref(&a));
    wait_for("the next write", WAIT, || count(&stats.writes) == 2);
    assert_eq!(read_file(&dav.file("node1")).unwrap().mappings(), vec![a]);
    assert!(!task.is_finished(), "the recorder goes on");
    assert_eq!(stats.failures(), 0);
}

// ---------------------------------------------------------------- the agent

/// The agent binary in the sandbox's node namespace with its WebDAV store
/// on 127.0.0.1 of that namespace — not started yet. NAT must work from the
/// start; the record appears once httpd is up.
#[test]
fn agent_with_its_webdav_store_down_programs_nat_and_records_it_later() {
    let w = World::new("stdav");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    // Any port but the relay's is free in the fresh node namespace.
    let port = w.sandbox.node.run(free_port);
    let mut dav = DavServer::new(port);

    let log = w.cluster.dir.join("agent-state.log");
    let file = File::create(&log).expect("agent log");
    let child = w
        .sandbox
        .node
        .command(env!("CARGO_BIN_EXE_podnat-controller"))
        .arg("--kubeconfig")
        .arg(&w.cluster.agent_kubeconfig)
        .args(["-nodeid", NODE, "-firewallflavor=nftables"])
        .args(["--public-address", support::netns::PUBLIC_IP])
        .arg("-stateflavor=webdav")
        .arg(format!("-stateuri={}", dav.url()))
        .env_remove("NODE_NAME")
        .env_remove("HOSTNAME")
        .env_remove("KUBECONFIG")
        .env("RUST_LOG", "info,podnat_controller=debug")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("start the agent");
    let agent = Agent { child, log };
    agent.wait_first_sync();

    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("the mapping in the kernel", WAIT, || {
        w.dnat().contains("203.0.113.7:25/tcp → 10.1.0.5:2525")
    });
    wait_for("TCP through the NAT", WAIT, || w.roundtrip(25));
    wait_for("the store failure logged", WAIT, || {
        agent.count("cannot write the state record") > 0
    });
    assert!(!dav.file(NODE).exists());

    dav.start(Some(&w.sandbox.node));
    wait_for("state.json written once httpd is up", WAIT, || {
        read_file(&dav.file(NODE)).is_some_and(|f| {
            f.mappings()
                == vec![Mapping {
                    pod_port: 2525,
                    ..mapping(25, [10, 1, 0, 5], "mail:mx-a")
                }]
        })
    });
    assert!(w.roundtrip(25), "NAT still works");
    assert!(agent.running(), "the agent is still running");
    assert!(
        agent.count("state record written after failed attempts") > 0,
        "{}",
        agent.log()
    );
}
