//! The agent's world for tests and benchmarks: a real apiserver
//! (`TestCluster`), a network sandbox (`Sandbox`), the agent binary running in
//! the sandbox's node namespace, and a TCP relay that lets it reach the
//! apiserver.
//!
//! Why a relay: the apiserver listens on 127.0.0.1 of the host's namespace,
//! and the agent must run in the node namespace (its netlink socket programs
//! the namespace it lives in). The relay listens on the same address and port
//! inside the node namespace and forwards each connection to the apiserver, so
//! the agent's kubeconfig works unchanged. TLS passes through untouched.
//!
//! Everything here is synchronous: kube calls run on a runtime of the world's
//! own; waiting is polling with a deadline.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{
    DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use tokio::runtime::Runtime;

use crate::support::cluster::TestCluster;
use crate::support::netns::{Netns, Sandbox, PUBLIC_IP, PUBLIC_IP6};

pub const ANNOTATION: &str = "bln.space/podnat";
pub const NODE: &str = "node1";
pub const NAMESPACE: &str = "mail";

/// The annotation value for `(srcPort, dstPort)` TCP entries.
pub fn annotation(entries: &[(u16, u16)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|(s, d)| format!(r#"{{"srcPort":{s},"dstPort":{d}}}"#))
        .collect();
    format!(r#"{{"entries":[{}]}}"#, items.join(","))
}

/// Polls `check` until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub const WAIT: Duration = Duration::from_secs(60);

pub struct World {
    pub rt: Runtime,
    pub admin: Client,
    pub proxy: ApiProxy,
    pub sandbox: Sandbox,
    pub cluster: TestCluster,
}

impl World {
    /// A cluster with the agent's RBAC (tests/fixtures/rbac.yaml) applied and
    /// the namespaces `podnat-system` and `mail`; a sandbox; the relay.
    pub fn new(tag: &str) -> World {
        let cluster = TestCluster::up();
        let sandbox = Sandbox::new(tag).with_ipv6();
        let proxy = ApiProxy::start(&sandbox.node, &cluster.server);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let admin = rt.block_on(async {
            let kc = Kubeconfig::read_from(&cluster.admin_kubeconfig).expect("admin kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .expect("admin config");
            Client::try_from(config).expect("admin client")
        });
        let world = World {
            rt,
            admin,
            proxy,
            sandbox,
            cluster,
        };
        for ns in ["podnat-system", NAMESPACE] {
            world.create_namespace(ns);
        }
        world.apply_yaml(&format!(
            "{}/tests/fixtures/rbac.yaml",
            env!("CARGO_MANIFEST_DIR")
        ));
        wait_for("the agent's RBAC in the authorizer", WAIT, || {
            world.agent_may("watch", "", "pods", "")
                && world.agent_may("create", "events.k8s.io", "events", NAMESPACE)
        });
        world
    }

    pub fn create_namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.admin.clone());
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        self.rt
            .block_on(api.create(&PostParams::default(), &ns))
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    }

    /// Creates every object of a multi-document YAML file, as `kubectl
    /// create -f` would.
    pub fn apply_yaml(&self, path: &str) {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: serde_json::Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}"));
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_json::from_value(value).expect("a Kubernetes object");
            let types = obj.types.clone().expect("apiVersion and kind");
            let gvk = GroupVersionKind::try_from(&types).expect("group/version/kind");
            let ar = ApiResource::from_gvk(&gvk);
            let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
                Some(ns) => Api::namespaced_with(self.admin.clone(), ns, &ar),
                None => Api::all_with(self.admin.clone(), &ar),
            };
            self.rt
                .block_on(api.create(&PostParams::default(), &obj))
                .unwrap_or_else(|e| panic!("create {} from {path}: {e}", types.kind));
        }
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.admin.clone(), NAMESPACE)
    }

    /// Does the agent identity's authorizer allow this (SelfSubjectAccessReview,
    /// as the agent)? RBAC changes reach the authorizer a moment after they
    /// are written; poll this to know they have.
    pub fn agent_may(&self, verb: &str, group: &str, resource: &str, namespace: &str) -> bool {
        use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
        let agent = self.rt.block_on(async {
            let kc =
                Kubeconfig::read_from(&self.cluster.agent_kubeconfig).expect("agent kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .expect("agent config");
            Client::try_from(config).expect("agent client")
        });
        let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
            "spec": {"resourceAttributes": {
                "verb": verb, "group": group, "resource": resource, "namespace": namespace
            }}
        }))
        .unwrap();
        let api: Api<SelfSubjectAccessReview> = Api::all(agent);
        let answer = self
            .rt
            .block_on(api.create(&PostParams::default(), &review))
            .expect("access review");
        answer.status.is_some_and(|s| s.allowed)
    }

    /// A pod bound to `node` (no scheduler here), with the podnat annotation
    /// when given. It has no status until [`World::set_running`].
    pub fn create_pod(&self, name: &str, node: &str, annotation: Option<&str>) {
        let mut meta = serde_json::json!({"name": name});
        if let Some(a) = annotation {
            meta["annotations"] = serde_json::json!({ ANNOTATION: a });
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "example.invalid/c"}]}
        }))
        .unwrap();
        self.rt
            .block_on(self.pods().create(&PostParams::default(), &pod))
            .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    }

    /// Many running pods at once (32 requests in flight), each
    /// `(name, annotation, pod IP)`, bound to `NODE`, as `create_pod` and
    /// `set_running` make them one by one.
    pub fn create_running_pods(&self, pods: Vec<(String, String, String)>) {
        use futures::StreamExt;
        let api = self.pods();
        self.rt.block_on(futures::stream::iter(pods).for_each_concurrent(
            32,
            |(name, value, ip)| {
                let api = api.clone();
                async move {
                    let pod: Pod = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": name, "annotations": {ANNOTATION: value}},
                        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "example.invalid/c"}]}
                    }))
                    .expect("pod");
                    api.create(&PostParams::default(), &pod)
                        .await
                        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
                    let status = serde_json::json!({"status": {
                        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                        "conditions": [{"type": "Ready", "status": "True"}]
                    }});
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                        .unwrap_or_else(|e| panic!("status of pod {name}: {e}"));
                }
            },
        ));
    }

    /// What a kubelet writes once the pod runs: phase, IP, Ready.
    pub fn set_running(&self, name: &str, ip: &str) {
        self.set_running_ips(name, &[ip]);
    }

    /// The same for a pod with several IPs (dual-stack: `podIP` is the
    /// first, `podIPs` lists them all, as the kubelet writes them).
    pub fn set_running_ips(&self, name: &str, ips: &[&str]) {
        let pod_ips: Vec<_> = ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
        let status = serde_json::json!({"status": {
            "phase": "Running", "podIP": ips[0], "podIPs": pod_ips,
            "conditions": [{"type": "Ready", "status": "True"}]
        }});
        self.rt
            .block_on(self.pods().patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            ))
            .unwrap_or_else(|e| panic!("status of pod {name}: {e}"));
    }

    /// Merges `metadata` (labels, annotations; `null` removes a key) into
    /// namespace `name`, as an admin's `kubectl label/annotate` does.
    pub fn patch_namespace(&self, name: &str, metadata: serde_json::Value) {
        let api: Api<Namespace> = Api::all(self.admin.clone());
        let patch = serde_json::json!({ "metadata": metadata });
        self.rt
            .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .unwrap_or_else(|e| panic!("patch namespace {name}: {e}"));
    }

    pub fn set_annotation(&self, name: &str, value: &str) {
        let patch = serde_json::json!({"metadata": {"annotations": { ANNOTATION: value }}});
        self.rt
            .block_on(
                self.pods()
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .unwrap_or_else(|e| panic!("annotate pod {name}: {e}"));
    }

    /// Without a kubelet, only a delete with grace period 0 removes a bound pod.
    pub fn delete_pod(&self, name: &str) {
        self.rt
            .block_on(
                self.pods()
                    .delete(name, &DeleteParams::default().grace_period(0)),
            )
            .unwrap_or_else(|e| panic!("delete pod {name}: {e}"));
    }

    /// Notes of the events with `reason` about pod `name`, oldest first.
    pub fn events(&self, name: &str, reason: &str) -> Vec<String> {
        let api: Api<Event> = Api::namespaced(self.admin.clone(), NAMESPACE);
        let list = self
            .rt
            .block_on(api.list(&ListParams::default()))
            .expect("list events");
        let mut found: Vec<_> = list
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .map(|e| (e.event_time.map(|t| t.0), e.note.unwrap_or_default()))
            .collect();
        found.sort();
        found.into_iter().map(|(_, n)| n).collect()
    }

    /// The agent, in the node namespace, as the agent identity, with
    /// `--public-address 203.0.113.7`.
    pub fn start_agent(&self, extra: &[&str]) -> Agent {
        let mut args = vec!["--public-address", PUBLIC_IP];
        args.extend_from_slice(extra);
        self.start_agent_with(&args)
    }

    /// The agent with these extra flags (public address detected unless one
    /// is passed; the nftables flavor unless one is passed).
    pub fn start_agent_with(&self, extra: &[&str]) -> Agent {
        // The nftables flavor unless the test picks one.
        let flavor: &[&str] = if extra.iter().any(|a| a.starts_with("-firewallflavor")) {
            &[]
        } else {
            &["-firewallflavor=nftables"]
        };
        let log = self.cluster.dir.join(format!(
            "agent-{}.log",
            AGENT_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&log).expect("agent log file");
        // PODNAT_AGENT_WRAP="heaptrack -o /tmp/ht/agent" (for example) runs
        // the agent under a profiler: benches use it for footprint work.
        let bin = env!("CARGO_BIN_EXE_podnat-controller");
        let wrap = std::env::var("PODNAT_AGENT_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(tool) => {
                let mut c = self.sandbox.node.command(tool);
                c.args(words).arg(bin);
                c
            }
            None => self.sandbox.node.command(bin),
        };
        // NODE_NAME as the chart sets it (exact: node-scoped watch), unless
        // the test gives a -nodeid of its own.
        if extra.iter().any(|a| a.starts_with("-nodeid")) {
            cmd.env_remove("NODE_NAME");
        } else {
            cmd.env("NODE_NAME", NODE);
        }
        let child = cmd
            .args(["--kubeconfig"])
            .arg(&self.cluster.agent_kubeconfig)
            .args(["-stateflavor=none"])
            .args(flavor)
            .args(extra)
            .env_remove("HOSTNAME")
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "info,podnat_controller=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start the agent");
        Agent { child, log }
    }

    /// The DNAT map as `nft` lists it: "203.0.113.7:25/tcp → 10.1.0.5:2525".
    pub fn dnat(&self) -> BTreeSet<String> {
        dnat_elements(&self.sandbox.node)
    }

    /// The IPv6 table's DNAT map: "2001:db8::7:25/tcp → fd00:1::5:2525".
    pub fn dnat6(&self) -> BTreeSet<String> {
        dnat_elements_of(&self.sandbox.node, "ip6")
    }

    /// One TCP round trip from the client to the public address.
    pub fn roundtrip(&self, port: u16) -> bool {
        roundtrip(&self.sandbox.client, port)
    }
}

static AGENT_SEQ: AtomicU64 = AtomicU64::new(0);

/// The agent process. Killed (SIGKILL) when dropped; its log is printed when
/// the test is failing, or always with PODNAT_TEST_AGENT_LOG=1.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the log that contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    pub fn wait_first_sync(&self) {
        wait_for("the agent's first sync", WAIT, || {
            assert!(self.running(), "the agent exited:\n{}", self.log());
            self.count("first sync applied") > 0
        });
    }

    /// The process is there and not a zombie.
    pub fn running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            })
            .unwrap_or(false)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for the agent") {
                return st;
            }
            assert!(Instant::now() < deadline, "the agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() || std::env::var_os("PODNAT_TEST_AGENT_LOG").is_some() {
            eprintln!(
                "===== agent log {} =====\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// Parses `nft -j list map ip podnat dnat_to_pod` (empty when the table or
/// map does not exist).
pub fn dnat_elements(node: &Netns) -> BTreeSet<String> {
    dnat_elements_of(node, "ip")
}

/// The same for the table of family `family` (`ip` or `ip6`).
pub fn dnat_elements_of(node: &Netns, family: &str) -> BTreeSet<String> {
    let out = node.try_sh(&format!("nft -j list map {family} podnat dnat_to_pod"));
    if !out.status.success() {
        return BTreeSet::new();
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    let mut set = BTreeSet::new();
    let items = doc["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(elems) = item["map"]["elem"].as_array() else {
            continue;
        };
        for pair in elems {
            let key = &pair[0];
            let key = if key["elem"].is_object() {
                &key["elem"]["val"]["concat"]
            } else {
                &key["concat"]
            };
            let val = &pair[1]["concat"];
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            set.insert(format!(
                "{}:{}/{} → {}:{}",
                text(&key[0]),
                text(&key[2]),
                text(&key[1]),
                text(&val[0]),
                text(&val[1])
            ));
        }
    }
    set
}

/// Connects from `client` to the public address, sends a byte and expects
/// the echo server behind the NAT to return it.
pub fn roundtrip(client: &Netns, port: u16) -> bool {
    let addr: SocketAddr = format!("{PUBLIC_IP}:{port}").parse().unwrap();
    crate::support::traffic::echo_roundtrip(client, addr)
}

/// The same to the public IPv6 address.
pub fn roundtrip6(client: &Netns, port: u16) -> bool {
    let addr: SocketAddr = format!("[{PUBLIC_IP6}]:{port}").parse().unwrap();
    crate::support::traffic::echo_roundtrip(client, addr)
}

/// A TCP echo server inside a pod namespace; stops when dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub accepted: Arc<AtomicU64>,
}

impl EchoServer {
    pub fn start(pod: &Netns, port: u16) -> EchoServer {
        // `[::]` takes IPv4 too (bindv6only is off): one server for both.
        let listener = pod.run(|| TcpListener::bind(("::", port)).expect("bind echo server"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut b = [0u8; 1];
                        if conn.read_exact(&mut b).is_ok() {
                            let _ = conn.write_all(&b);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        EchoServer {
            stop,
            thread: Some(thread),
            accepted,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwards TCP from `127.0.0.1:PORT` inside a namespace to the same address
/// in the host's namespace (see the module comment).
pub struct ApiProxy {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiProxy {
    pub fn start(ns: &Netns, server: &str) -> ApiProxy {
        let addr: SocketAddr = server
            .trim_start_matches("https://")
            .parse()
            .expect("server is https://IP:PORT");
        let listener = ns.run(|| TcpListener::bind(addr).expect("bind the relay in the namespace"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, c) = (stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                // This thread is in the host's namespace: so is `up`.
                let Ok(up) = TcpStream::connect(addr) else {
                    continue; // apiserver stopped: the agent sees a reset
                };
                let _ = down.set_nonblocking(false);
                let mut list = c.lock().unwrap();
                list.retain(|s| s.peer_addr().is_ok());
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                        let _ = from.shutdown(std::net::Shutdown::Read);
                    });
                }
                list.push(down);
                list.push(up);
            }
        });
        ApiProxy {
            stop,
            conns,
            thread: Some(thread),
        }
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(list) = self.conns.lock() {
            for s in list.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Connections from a namespace to the public address in a loop, counting
/// round trips that worked and that failed; stops when dropped.
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl ClientLoop {
    pub fn start(client: &Netns, port: u16) -> ClientLoop {
        use std::os::fd::AsFd;
        let path = format!("/run/netns/{}", client.name);
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let addr: SocketAddr = format!("{PUBLIC_IP}:{port}").parse().unwrap();
        let thread = std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let result =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut c| {
                        c.set_read_timeout(Some(Duration::from_secs(2)))?;
                        c.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        c.read_exact(&mut b)
                    });
                match result {
                    Ok(()) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        failures.push(e.to_string());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            failures
        });
        ClientLoop {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more round trips worked.
    pub fn wait_more(&self, n: u64) {
        let start = self.ok();
        wait_for("more round trips through the NAT", WAIT, || {
            self.ok() >= start + n
        });
    }

    /// Stops the loop: (worked, failure messages).
    pub fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .thread
            .take()
            .map(|t| t.join().expect("client loop"))
            .unwrap_or_default();
        (self.ok(), failures)
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
