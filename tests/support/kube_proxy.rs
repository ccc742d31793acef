//! A real kube-proxy (tests/cluster/bin/kube-proxy, built by tests/cluster/build
//! from the same pinned k8s.io/kubernetes as the apiserver) in a sandbox's
//! node namespace, against the test apiserver through the harness relay (the
//! kubeconfig's 127.0.0.1:PORT answers inside the namespace too). It runs
//! with the admin kubeconfig: kube-proxy is tooling here, its own RBAC is not
//! under test. Flags that would change host-wide state are off (conntrack
//! sysctls at 0: nf_conntrack_max is global; no route_localnet). Stopped and
//! its rules removed (`kube-proxy --cleanup`, in the namespace) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::ruleset;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Nftables,
    Iptables,
}

impl ProxyMode {
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
        }
    }
}

pub fn binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/bin/kube-proxy")
}

/// A loopback port nothing in `ns` listens on right now.
fn free_port(ns: &Netns) -> u16 {
    ns.run(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    })
}

/// One histogram of kube-proxy's /metrics: cumulative buckets, sum, count.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// What was observed since `earlier`.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, c)| *c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, c - before(le)))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile, interpolated within its bucket as Prometheus'
    /// histogram_quantile does; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = cum - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (le - lower) * frac);
            }
            (lower, below) = (le, cum);
        }
        Some(lower)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

/// The value of one series (exact name and labels) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// GET `http://127.0.0.1:PORT/PATH` inside `ns`; `None` while nothing answers.
pub fn http_get(ns: &Netns, port: u16, path: &str) -> Option<String> {
    let out = ns.try_sh(&format!(
        "curl -fsS --max-time 5 http://127.0.0.1:{port}{path}"
    ));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct KubeProxy<'a> {
    node: &'a Netns,
    child: Child,
    pub mode: ProxyMode,
    metrics_port: u16,
    pub log: PathBuf,
}

impl<'a> KubeProxy<'a> {
    /// Starts kube-proxy in `node` as Node `node_name`; its log goes to
    /// `log_dir/kube-proxy-MODE.log`. Waits until its first sync is done.
    pub fn start(
        node: &'a Netns,
        kubeconfig: &Path,
        mode: ProxyMode,
        node_name: &str,
        log_dir: &Path,
    ) -> KubeProxy<'a> {
        let bin = binary();
        assert!(
            bin.exists(),
            "{} is missing: run tests/cluster/build",
            bin.display()
        );
        let metrics_port = free_port(node);
        let healthz_port = loop {
            let p = free_port(node);
            if p != metrics_port {
                break p;
            }
        };
        let log = log_dir.join(format!("kube-proxy-{}.log", mode.name()));
        let file = std::fs::File::create(&log).expect("kube-proxy log file");
        let child = node
            .command(bin.to_str().expect("UTF-8 path"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--proxy-mode={}", mode.name()))
            .arg(format!("--hostname-override={node_name}"))
            .arg("--cluster-cidr=10.1.0.0/16")
            .arg(format!("--metrics-bind-address=127.0.0.1:{metrics_port}"))
            .arg(format!("--healthz-bind-address=127.0.0.1:{healthz_port}"))
            .args([
                // Host-wide or not ours to change: leave as they are.
                "--conntrack-max-per-core=0",
                "--conntrack-min=0",
                "--conntrack-tcp-timeout-established=0s",
                "--conntrack-tcp-timeout-close-wait=0s",
                "--conntrack-udp-timeout=0s",
                "--conntrack-udp-timeout-stream=0s",
                "--iptables-localhost-nodeports=false",
                "--oom-score-adj=0",
                // "SyncProxyRules complete" with its duration, per sync.
                "--v=2",
            ])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start kube-proxy");
        let kp = KubeProxy {
            node,
            child,
            mode,
            metrics_port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while kp.syncs().count < 1.0 {
            assert!(kp.running(), "kube-proxy exited:\n{}", kp.log_text());
            assert!(
                Instant::now() < deadline,
                "kube-proxy made no sync in 60 s:\n{}",
                kp.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        kp
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .map(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, r)| !r.starts_with('Z'))
            })
            .unwrap_or(false)
    }

    pub fn metrics(&self) -> String {
        http_get(self.node, self.metrics_port, "/metrics").unwrap_or_default()
    }

    /// `kubeproxy_sync_proxy_rules_duration_seconds` for IPv4.
    pub fn syncs(&self) -> Histogram {
        let text = self.metrics();
        let name = "kubeproxy_sync_proxy_rules_duration_seconds";
        let family = r#"ip_family="IPv4""#;
        let mut h = Histogram {
            sum: sample(&text, &format!("{name}_sum{{{family}}}")).unwrap_or(0.0),
            count: sample(&text, &format!("{name}_count{{{family}}}")).unwrap_or(0.0),
            ..Histogram::default()
        };
        let prefix = format!("{name}_bucket{{{family},le=\"");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((le, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            h.buckets.push((le, value.trim().parse().unwrap_or(0.0)));
        }
        h
    }

    /// Sync durations kube-proxy logged (IPv4), oldest first: exact values
    /// beside the histogram's bucket-interpolated ones.
    pub fn logged_syncs(&self) -> Vec<Duration> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("\"SyncProxyRules complete\"") && l.contains("IPv4"))
            .filter_map(|l| {
                let v = l.split("elapsed=\"").nth(1)?.split('"').next()?;
                parse_go_duration(v)
            })
            .collect()
    }

    /// Waits until no change is pending and no sync happened for 2.5 s
    /// (more than twice the minimum sync period of 1 s).
    pub fn quiesce(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = (f64::NAN, Instant::now());
        loop {
            assert!(self.running(), "kube-proxy exited:\n{}", self.log_text());
            let text = self.metrics();
            let stamp = sample(
                &text,
                r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#,
            );
            let pending = ["endpoint", "service"].iter().any(|k| {
                sample(
                    &text,
                    &format!("kubeproxy_sync_proxy_rules_{k}_changes_pending"),
                )
                .is_none_or(|v| v > 0.0)
            });
            match stamp {
                Some(s) if !pending && s == last.0 => {
                    if last.1.elapsed() > Duration::from_millis(2500) {
                        return;
                    }
                }
                _ => last = (stamp.unwrap_or(f64::NAN), Instant::now()),
            }
            assert!(Instant::now() < deadline, "kube-proxy never went quiet");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// kube-proxy's rules, comparable text: `ip kube-proxy` (nftables mode),
    /// or every KUBE-* chain and rule of iptables-nft, sorted (iptables mode:
    /// it writes KUBE-SERVICES in map order).
    pub fn rules(&self) -> Vec<String> {
        match self.mode {
            ProxyMode::Nftables => ruleset::nft_table(self.node, "ip", "kube-proxy", true),
            ProxyMode::Iptables => {
                let mut lines = ruleset::iptables_lines(self.node, |l| l.contains("KUBE-"));
                lines.sort();
                lines
            }
        }
    }
}

impl Drop for KubeProxy<'_> {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = self
            .node
            .command(binary().to_str().unwrap_or_default())
            .args(["--cleanup", "--v=0"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "kube-proxy --cleanup in {} failed ({}): {}",
                self.node.name,
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot run kube-proxy --cleanup: {e}"),
        }
        if std::thread::panicking() || std::env::var_os("PODNAT_TEST_AGENT_LOG").is_some() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            eprintln!(
                "===== kube-proxy log {} (last 80 lines) =====",
                self.log.display()
            );
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Go's time.Duration text ("79.4ms", "1.2s", "950µs", "1m2.5s").
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        let value: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "µs" | "us" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = next;
    }
    Some(Duration::from_secs_f64(total))
}
