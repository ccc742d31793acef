//! Throw-away network namespaces for kernel tests. Every test makes its own
//! (`ip netns add`), runs code or commands inside, and removes them on drop —
//! also when the test panics. Nothing here touches the host's own namespace.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace that lives as long as this value.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `pn-<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("pn-{tag}-{}-{n}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// Runs a shell script inside; panics with its output when it fails.
    pub fn sh(&self, script: &str) -> String {
        let out = self.try_sh(script);
        assert!(
            out.status.success(),
            "in {}: `{script}` failed ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_sh(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec")
    }

    /// Waits (at most 10 s) until no IPv6 address here is tentative: the
    /// link-local addresses go through duplicate detection, and until they
    /// are done the first packets to a neighbour can be lost.
    pub fn settle_ipv6(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.sh("ip -6 addr show tentative").trim().is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// A command to run inside the namespace (`ip netns exec NAME prog ...`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets made
    /// there stay in this namespace after they are returned.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs inside, then remove the namespace.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects two namespaces with a veth pair and addresses both ends.
/// `a_addr`/`b_addr` are `a.b.c.d/len`.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    let tmp = format!("pnv{}", COUNTER.fetch_add(1, Ordering::SeqCst));
    let st = Command::new("ip")
        .args([
            "link", "add", &tmp, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ])
        .status()
        .expect("ip link add veth");
    assert!(st.success(), "ip link add veth failed");
    a.sh(&format!(
        "ip link set {tmp} name {a_if} && ip addr add {a_addr} dev {a_if} && ip link set {a_if} up"
    ));
    b.sh(&format!(
        "ip addr add {b_addr} dev {b_if} && ip link set {b_if} up"
    ));
}

/// The standard sandbox: a "node" with a public address 203.0.113.7 towards a
/// "client" (203.0.113.1), and two "pods" (10.1.0.5 and 10.1.1.5) behind the
/// node, each on its own veth, with forwarding on in the node.
pub struct Sandbox {
    pub node: Netns,
    pub client: Netns,
    pub pod_a: Netns,
    pub pod_b: Netns,
}

pub const PUBLIC_IP: &str = "203.0.113.7";
pub const CLIENT_IP: &str = "203.0.113.1";
pub const POD_A_IP: &str = "10.1.0.5";
pub const POD_B_IP: &str = "10.1.1.5";
pub const PUBLIC_IP6: &str = "2001:db8::7";
pub const CLIENT_IP6: &str = "2001:db8::1";
pub const POD_A_IP6: &str = "fd00:1::5";
pub const POD_B_IP6: &str = "fd00:2::5";

impl Sandbox {
    pub fn new(tag: &str) -> Sandbox {
        let node = Netns::new(&format!("{tag}n"));
        let client = Netns::new(&format!("{tag}c"));
        let pod_a = Netns::new(&format!("{tag}a"));
        let pod_b = Netns::new(&format!("{tag}b"));
        veth(
            &node,
            "pub0",
            "203.0.113.7/24",
            &client,
            "eth0",
            "203.0.113.1/24",
        );
        veth(&node, "poda", "10.1.0.1/24", &pod_a, "eth0", "10.1.0.5/24");
        veth(&node, "podb", "10.1.1.1/24", &pod_b, "eth0", "10.1.1.5/24");
        pod_a.sh("ip route add default via 10.1.0.1");
        pod_b.sh("ip route add default via 10.1.1.1");
        node.sh("sysctl -qw net.ipv4.ip_forward=1");
        Sandbox {
            node,
            client,
            pod_a,
            pod_b,
        }
    }

    /// Adds the IPv6 side: public 2001:db8::7 towards the client
    /// 2001:db8::1, pods fd00:1::5 and fd00:2::5 with default routes via the
    /// node, IPv6 forwarding on; no duplicate detection (nothing tentative).
    pub fn with_ipv6(self) -> Sandbox {
        self.node
            .sh("ip -6 addr add 2001:db8::7/64 dev pub0 nodad && \
             ip -6 addr add fd00:1::1/64 dev poda nodad && \
             ip -6 addr add fd00:2::1/64 dev podb nodad && \
             sysctl -qw net.ipv6.conf.all.forwarding=1");
        self.client
            .sh("ip -6 addr add 2001:db8::1/64 dev eth0 nodad");
        self.pod_a.sh(
            "ip -6 addr add fd00:1::5/64 dev eth0 nodad && ip -6 route add default via fd00:1::1",
        );
        self.pod_b.sh(
            "ip -6 addr add fd00:2::5/64 dev eth0 nodad && ip -6 route add default via fd00:2::1",
        );
        for ns in [&self.node, &self.client, &self.pod_a, &self.pod_b] {
            ns.settle_ipv6();
        }
        self
    }
}
