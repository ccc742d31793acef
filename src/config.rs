//! Command line → validated `Config`. Accepts the Go version's spellings
//! (`-dryrun`, `-annotationKey=x`, `-nodeID`, klog's `-v=2`, `-logtostderr`)
//! beside the usual `--kebab-case`, so old chart values keep working.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::model::{DualStack, Families, Family};
pub use crate::plan::selector::NamespaceSelector;

mod http;
pub use http::{HttpConfig, HttpFlags, TlsSource};

/// Which rule layout the agent programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavor {
    /// iptables-nft's own tables and chains (the Go version's layout).
    Iptables,
    /// A table of the agent's own with maps and sets.
    Nftables,
}

/// Where the per-node NAT table is persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFlavor {
    Configmap,
    Webdav,
    None,
}

/// Jump positions in FORWARD, PREROUTING, POSTROUTING (Go: `-iptablesJump`),
/// and in nat OUTPUT (a fourth value, for `-localaccess`; -2 when not given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpPositions {
    pub forward: i32,
    pub prerouting: i32,
    pub postrouting: i32,
    pub output: i32,
}

impl Default for JumpPositions {
    fn default() -> Self {
        JumpPositions {
            forward: -2,
            prerouting: -2,
            postrouting: -2,
            output: -2,
        }
    }
}

fn parse_jump(s: &str) -> Result<JumpPositions, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 3 && parts.len() != 4 {
        return Err(format!(
            "expected three or four comma-separated positions (FORWARD,PREROUTING,POSTROUTING[,OUTPUT]), got {}",
            parts.len()
        ));
    }
    let mut n = [-2i32; 4];
    for (i, p) in parts.iter().enumerate() {
        n[i] = p
            .parse()
            .map_err(|_| format!("position {p:?} is not an integer"))?;
    }
    Ok(JumpPositions {
        forward: n[0],
        prerouting: n[1],
        postrouting: n[2],
        output: n[3],
    })
}

fn parse_ports(s: &str) -> Result<BTreeSet<u16>, String> {
    let mut out = BTreeSet::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: u64 = p
            .parse()
            .map_err(|_| format!("port {p:?} is not a number"))?;
        if n == 0 || n > 65535 {
            return Err(format!("port {n} is out of range 1-65535"));
        }
        out.insert(n as u16);
    }
    Ok(out)
}

fn parse_nets(s: &str) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: IpNet = p
            .parse()
            .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{p:?} is not an IPv4 or IPv6 network (a.b.c.d/n, x:y::/n)"))?;
        out.push(net.trunc());
    }
    Ok(out)
}

fn parse_families(s: &str) -> Result<Families, String> {
    let mut f = Families {
        ipv4: false,
        ipv6: false,
    };
    for p in s.split(',').map(str::trim) {
        match p.to_ascii_lowercase().as_str() {
            "ipv4" => f.ipv4 = true,
            "ipv6" => f.ipv6 = true,
            _ => {
                return Err(format!(
                    "{p:?} is not a family; use ipv4, ipv6 or ipv4,ipv6"
                ))
            }
        }
    }
    Ok(f)
}

/// `--public-address`: one address per family, comma-separated.
fn parse_public(s: &str) -> Result<DualStack, String> {
    let mut d = DualStack::default();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip: IpAddr = p
            .parse()
            .map_err(|_| format!("{p:?} is not an IPv4 or IPv6 address"))?;
        if d.get(Family::of(ip)).is_some() {
            return Err(format!(
                "two {} addresses; give one per family",
                Family::of(ip)
            ));
        }
        d.add(ip);
    }
    if d.is_empty() {
        return Err("expected an address".into());
    }
    Ok(d)
}

fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 20
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if ok {
        Ok(s.to_string())
    } else {
        Err("expected 1-20 letters, digits, '-' or '_', starting with a letter".into())
    }
}

fn parse_uri(s: &str) -> Result<String, String> {
    if (s.starts_with("http://") || s.starts_with("https://")) && s.len() > "https://".len() {
        Ok(s.trim_end_matches('/').to_string())
    } else {
        Err("expected an http:// or https:// URL".into())
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    // Go's strconv.ParseBool spellings.
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "podnat-controller",
    version,
    about = "Direct DNAT/SNAT on the node's public IPv4 for annotated pods, programmed through nf_tables netlink",
    long_about = None
)]
pub struct Cli {
    #[command(flatten)]
    pub flags: Flags,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Remove everything the agent owns from the kernel, in both flavors and both families (found by its mark), nothing else.
    Cleanup {
        /// Remove only what the Go version cannot manage (local access, hairpin, IPv6, a port's second protocol, the nftables tables) and keep the rest, so traffic never stops on a rollback
        #[arg(long = "for-go-version")]
        for_go_version: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct Flags {
    /// Print the changes the agent would make; touch nothing [Go: -dryrun]
    #[arg(long = "dry-run", global = true, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub dry_run: bool,
    /// Annotation to watch [Go: -annotationkey]
    #[arg(
        long = "annotation-key",
        global = true,
        default_value = "bln.space/podnat"
    )]
    pub annotation_key: String,
    /// Seconds between full resyncs; 0 disables them [Go: -informerresync]
    #[arg(
        long = "informer-resync",
        global = true,
        value_name = "SECONDS",
        default_value_t = 180
    )]
    pub informer_resync: u64,
    /// Ports never NATed, as source or destination [Go: -restrictedports]
    #[arg(long = "restricted-ports", global = true, value_name = "PORTS", default_value = "22,53,6443", value_parser = parse_ports)]
    pub restricted_ports: BTreeSet<u16>,
    /// HTTP port for health, readiness, entries and metrics [Go: -httpport]
    #[arg(
        long = "http-port",
        global = true,
        value_name = "PORT",
        default_value_t = 8484
    )]
    pub http_port: u16,
    /// Rule layout: iptables (iptables-nft's tables) or nftables (a table of its own) [Go: -firewallflavor]
    #[arg(
        long = "firewall-flavor",
        global = true,
        value_enum,
        default_value = "iptables"
    )]
    pub firewall_flavor: Flavor,
    /// Jump positions in FORWARD,PREROUTING,POSTROUTING[,OUTPUT]; n>0 the n-th rule, n<0 from the end [Go: -iptablesJump]
    #[arg(long = "iptables-jump", global = true, value_name = "F,P,Q[,O]", default_value = "-2,-2,-2", value_parser = parse_jump, allow_hyphen_values = true)]
    pub iptables_jump: JumpPositions,
    /// Extra networks ignored by public address detection (comma-separated CIDRs) [Go: -inclfilternet]
    #[arg(long = "incl-filter-net", global = true, value_name = "CIDRS", value_parser = parse_nets, action = clap::ArgAction::Append)]
    pub incl_filter_net: Vec<Vec<IpNet>>,
    /// Default-filtered networks to allow again (comma-separated CIDRs) [Go: -exclfilternet, -excludefilternetworks]
    #[arg(long = "excl-filter-net", global = true, value_name = "CIDRS", value_parser = parse_nets, action = clap::ArgAction::Append)]
    pub excl_filter_net: Vec<Vec<IpNet>>,
    /// DNAT for connections from the node itself and hairpin for its pods; false keeps the Go version's layout [SPEC: -localaccess]
    #[arg(long = "local-access", global = true, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true", value_parser = parse_bool)]
    pub local_access: bool,
    /// iptables flavor: count every packet of each mapping in chains of the agent's in ip mangle (a rule per mapping on every DNATed packet's path; the nftables flavor always counts, with a set lookup) [-iptablescounters]
    #[arg(long = "iptables-counters", global = true, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub iptables_counters: bool,
    /// Address families to publish on: ipv4, ipv6 or ipv4,ipv6 [SPEC: -ipfamilies]
    #[arg(long = "ip-families", global = true, value_name = "FAMILIES", default_value = "ipv4", value_parser = parse_families)]
    pub ip_families: Families,
    /// Prefix of chains, table and comments [Go: -resourceprefix]
    #[arg(long = "resource-prefix", global = true, value_name = "PREFIX", default_value = "podnat", value_parser = parse_prefix)]
    pub resource_prefix: String,
    /// State store: configmap, webdav or none [Go: -stateflavor]
    #[arg(
        long = "state-flavor",
        global = true,
        value_enum,
        default_value = "configmap"
    )]
    pub state_flavor: StateFlavor,
    /// WebDAV endpoint of the state store [Go: -stateuri]
    #[arg(long = "state-uri", global = true, value_name = "URL", default_value = "http://podnat-state-store:80", value_parser = parse_uri)]
    pub state_uri: String,
    /// Node to serve (default: NODE_NAME, else HOSTNAME); matched by short name [Go: -nodeid]
    #[arg(long = "node-id", global = true, value_name = "NODE")]
    pub node_id: Option<String>,
    /// klog verbosity of the Go version: 0-1 info, 2-4 debug, 5+ trace (RUST_LOG wins) [Go: -v]
    #[arg(long = "v", global = true, value_name = "N", default_value_t = 0)]
    pub verbosity: u8,
    /// Run one reconcile for this JSON pod list (as `kubectl get pods -o json` prints) and exit
    #[arg(long = "pods-file", global = true, value_name = "FILE")]
    pub pods_file: Option<PathBuf>,
    /// Use these public addresses (one per family, comma-separated) instead of auto detection
    #[arg(long = "public-address", global = true, value_name = "IP[,IP]", value_parser = parse_public)]
    pub public_address: Option<DualStack>,
    /// Kubeconfig file (default: in-cluster config, else KUBECONFIG, else ~/.kube/config)
    #[arg(long = "kubeconfig", global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Refuse a mapping onto a port the node itself serves (TCP listener, bound UDP socket) on its address or the wildcard [SPEC: -guardnodeports]
    #[arg(long = "guard-node-ports", global = true, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true", value_parser = parse_bool)]
    pub guard_node_ports: bool,
    /// Only pods in namespaces whose labels match this selector publish (Kubernetes label-selector syntax; empty: all) [SPEC: -namespaceselector]
    #[arg(long = "namespace-selector", global = true, value_name = "SELECTOR", default_value = "", value_parser = parse_selector)]
    pub namespace_selector: NamespaceSelector,
    #[command(flatten)]
    pub http: HttpFlags,
}

fn parse_selector(s: &str) -> Result<NamespaceSelector, String> {
    NamespaceSelector::parse(s)
}

/// Go-version (and lowercase) flag names → the canonical long name.
const ALIASES: &[(&str, &str)] = &[
    ("dryrun", "dry-run"),
    ("annotationkey", "annotation-key"),
    ("informerresync", "informer-resync"),
    ("restrictedports", "restricted-ports"),
    ("httpport", "http-port"),
    ("firewallflavor", "firewall-flavor"),
    ("iptablesjump", "iptables-jump"),
    ("inclfilternet", "incl-filter-net"),
    ("exclfilternet", "excl-filter-net"),
    ("excludefilternetworks", "excl-filter-net"),
    ("resourceprefix", "resource-prefix"),
    ("stateflavor", "state-flavor"),
    ("stateuri", "state-uri"),
    ("nodeid", "node-id"),
    ("ipfamilies", "ip-families"),
    ("localaccess", "local-access"),
    ("iptablescounters", "iptables-counters"),
    ("podsfile", "pods-file"),
    ("publicaddress", "public-address"),
    ("guardnodeports", "guard-node-ports"),
    ("namespaceselector", "namespace-selector"),
];

/// klog flags the Go binary registered: accepted, without effect. The bool is
/// true when the flag takes a value (so `-log_dir /x` consumes `/x`).
const KLOG_NOOPS: &[(&str, bool)] = &[
    ("logtostderr", false),
    ("alsologtostderr", false),
    ("skip_headers", false),
    ("skip_log_headers", false),
    ("add_dir_header", false),
    ("one_output", false),
    ("stderrthreshold", true),
    ("vmodule", true),
    ("log_dir", true),
    ("log_file", true),
    ("log_file_max_size", true),
    ("log_backtrace_at", true),
    ("log_flush_frequency", true),
];

/// Rewrites Go-style arguments into clap's spelling. Returns the rewritten
/// argv and the klog flags that were dropped (to be logged once).
pub fn normalize_args(args: Vec<OsString>) -> (Vec<OsString>, Vec<String>) {
    let mut out = Vec::with_capacity(args.len());
    let mut ignored = Vec::new();
    let mut iter = args.into_iter();
    if let Some(bin) = iter.next() {
        out.push(bin);
    }
    let mut rest_verbatim = false;
    while let Some(arg) = iter.next() {
        let Some(s) = arg.to_str().map(str::to_owned) else {
            out.push(arg);
            continue;
        };
        if rest_verbatim || !s.starts_with('-') || s == "-" || s == "--" {
            rest_verbatim |= s == "--";
            out.push(arg);
            continue;
        }
        let body = s.trim_start_matches('-');
        let dashes = s.len() - body.len();
        // Negative numbers (`-iptablesJump -1,2,-3`) are values, not flags.
        if dashes > 2 || body.is_empty() || body.starts_with(|c: char| c.is_ascii_digit()) {
            out.push(arg);
            continue;
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let lower = name.to_ascii_lowercase();
        if let Some(&(_, takes_value)) = KLOG_NOOPS.iter().find(|(n, _)| *n == lower) {
            ignored.push(format!("-{lower}"));
            if takes_value && value.is_none() {
                iter.next();
            }
            continue;
        }
        let canonical = ALIASES
            .iter()
            .chain(http::ALIASES)
            .find(|(alias, canon)| *alias == lower || *canon == lower)
            .map(|(_, canon)| *canon);
        let canonical = match canonical {
            Some(c) => c.to_string(),
            // klog's -v / --v.
            None if lower == "v" => "v".to_string(),
            // A single-dash short flag (-h, -V) stays as it is.
            None if dashes == 1 && name.len() == 1 => {
                out.push(arg);
                continue;
            }
            // Unknown: hand clap the long form so it can suggest the right name.
            None => name.to_string(),
        };
        match value {
            Some(v) => out.push(OsString::from(format!("--{canonical}={v}"))),
            None => out.push(OsString::from(format!("--{canonical}"))),
        }
    }
    (out, ignored)
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub dry_run: bool,
    pub annotation_key: String,
    pub informer_resync_secs: u64,
    pub restricted_ports: BTreeSet<u16>,
    pub http_port: u16,
    /// -httpauth, -httpaddress and the TLS certificate.
    pub http: HttpConfig,
    pub flavor: Flavor,
    pub jump: JumpPositions,
    pub incl_filter_net: Vec<IpNet>,
    pub excl_filter_net: Vec<IpNet>,
    pub families: Families,
    pub local_access: bool,
    /// `-iptablescounters`.
    pub iptables_counters: bool,
    pub resource_prefix: String,
    pub state_flavor: StateFlavor,
    pub state_uri: String,
    /// The node as given (`-nodeid`, NODE_NAME or HOSTNAME); `None` if none is known.
    pub node_id: Option<String>,
    /// The node id is the node's exact name: it came from NODE_NAME (the
    /// downward API) or is a full name with dots. Otherwise (a short
    /// `-nodeid` or HOSTNAME) nodes are matched by short name, as the Go
    /// version did, which needs a cluster-wide pod watch.
    pub node_id_exact: bool,
    pub verbosity: u8,
    pub pods_file: Option<PathBuf>,
    pub public_address: Option<DualStack>,
    pub kubeconfig: Option<PathBuf>,
    pub command: Option<Command>,
    /// klog flags that were accepted without effect.
    pub ignored_flags: Vec<String>,
    /// `-guardnodeports`.
    pub guard_node_ports: bool,
    /// `-namespaceselector` (`selects_all` when empty).
    pub namespace_selector: NamespaceSelector,
}

impl Config {
    /// Parses the process arguments; `env` looks up NODE_NAME / HOSTNAME.
    pub fn parse_from(
        args: Vec<OsString>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, clap::Error> {
        let (args, ignored) = normalize_args(args);
        let cli = Cli::try_parse_from(args)?;
        let config = Config::from_cli(cli, ignored, env)?;
        // An address of a family the agent does not serve would be shown
        // but never used: refused like any other bad value.
        if let Some(p) = &config.public_address {
            for ip in p.iter() {
                let family = Family::of(ip);
                if !config.families.contains(family) {
                    let msg = format!(
                        "invalid value '{ip}' for '--public-address <IP[,IP]>': {family} is not enabled (--ip-families={})",
                        config.families
                    );
                    return Err(clap::Error::raw(
                        clap::error::ErrorKind::ValueValidation,
                        msg,
                    ));
                }
            }
        }
        Ok(config)
    }

    fn from_cli(
        cli: Cli,
        ignored_flags: Vec<String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, clap::Error> {
        let f = cli.flags;
        let http = f
            .http
            .validate()
            .map_err(|msg| clap::Error::raw(clap::error::ErrorKind::ValueValidation, msg))?;
        let from_flag = f.node_id.filter(|s| !s.is_empty());
        let from_node_name = env("NODE_NAME").filter(|s| !s.is_empty());
        let node_id_exact = from_flag.is_none() && from_node_name.is_some()
            || from_flag
                .as_deref()
                .is_some_and(|id| id.contains('.') || from_node_name.as_deref() == Some(id));
        let node_id = from_flag
            .or(from_node_name)
            .or_else(|| env("HOSTNAME").filter(|s| !s.is_empty()));
        let node_id_exact = node_id_exact || node_id.as_deref().is_some_and(|id| id.contains('.'));
        Ok(Config {
            dry_run: f.dry_run,
            annotation_key: f.annotation_key,
            informer_resync_secs: f.informer_resync,
            restricted_ports: f.restricted_ports,
            http_port: f.http_port,
            http,
            flavor: f.firewall_flavor,
            jump: f.iptables_jump,
            incl_filter_net: f.incl_filter_net.into_iter().flatten().collect(),
            excl_filter_net: f.excl_filter_net.into_iter().flatten().collect(),
            families: f.ip_families,
            local_access: f.local_access,
            iptables_counters: f.iptables_counters,
            resource_prefix: f.resource_prefix,
            state_flavor: f.state_flavor,
            state_uri: f.state_uri,
            node_id,
            node_id_exact,
            verbosity: f.verbosity,
            pods_file: f.pods_file,
            public_address: f.public_address,
            kubeconfig: f.kubeconfig,
            command: cli.command,
            ignored_flags,
            guard_node_ports: f.guard_node_ports,
            namespace_selector: f.namespace_selector,
        })
    }

    /// Default tracing filter for `-v=N` (RUST_LOG, when set, wins).
    pub fn log_filter(&self) -> &'static str {
        match self.verbosity {
            0..=1 => "info",
            2..=4 => "debug",
            _ => "trace",
        }
    }
}

/// The first label of a node name: `node1.example.org` → `node1`. The Go
/// version matched nodes this way.
pub fn short_node_name(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

#[cfg(test)]
mod tests;
