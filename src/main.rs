//! Wiring only: flags → config → the chosen mode.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::error::ErrorKind;
use podnat_controller::config::{Command, Config};
use podnat_controller::firewall::netlink::NetlinkError;
use podnat_controller::firewall::{backend_for, FirewallError, Names};
use podnat_controller::kube::pod;
use podnat_controller::plan::{self, PlanConfig};

fn main() -> ExitCode {
    let config = match Config::parse_from(std::env::args_os().collect(), |k| std::env::var(k).ok())
    {
        Ok(c) => c,
        Err(e) => return flag_error(e),
    };
    init_logging(&config);
    if !config.ignored_flags.is_empty() {
        tracing::info!(flags = ?config.ignored_flags, "klog flags of the Go version accepted; they have no effect here");
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podnat-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A bad flag stops the agent with exit status 2 and one line naming the flag
/// and the value; help and version go to stdout as usual.
fn flag_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            let text = e.render().to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect();
            eprintln!(
                "podnat-controller: {}",
                line.join(" ").trim_start_matches("error: ")
            );
            ExitCode::from(2)
        }
        _ => {
            let _ = e.print();
            ExitCode::from(2)
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config.log_filter()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(config: Config) -> anyhow::Result<()> {
    let names = Names::new(&config.resource_prefix);
    let mut backend = backend_for(config.flavor, names.clone());
    if let Some(Command::Cleanup) = config.command {
        if config.dry_run {
            println!(
                "# cleanup would remove everything the {} flavor owns",
                backend.name()
            );
            return Ok(());
        }
        let removed = backend.cleanup().context("cleanup")?;
        tracing::info!(flavor = backend.name(), removed, "cleanup done");
        return Ok(());
    }
    let Some(pods_file) = config.pods_file.clone() else {
        bail!(
            "no Kubernetes cluster to watch: this version runs only with --pods-file FILE \
             (a JSON pod list, as `kubectl get pods -o json` prints)"
        );
    };
    let node_id = config
        .node_id
        .clone()
        .context("no node id: pass -nodeid NODE or set NODE_NAME (or HOSTNAME)")?;
    let pods = pod::read_pods_file(&pods_file)?;
    let facts: Vec<_> = pods
        .iter()
        .map(|p| pod::facts(p, &config.annotation_key))
        .collect();
    let table = plan::plan(
        &facts,
        config.public_address,
        &PlanConfig {
            node_id,
            restricted_ports: config.restricted_ports.clone(),
        },
    );
    for r in &table.rejected {
        tracing::warn!(pod = %r.pod, "invalid annotation: {}", r.error);
    }
    for c in &table.conflicts {
        tracing::warn!(pod = %c.loser, "{} is taken by {}", c.key, c.winner);
    }
    for p in &table.pending {
        tracing::warn!(pod = %p.pod, entry = p.entry, "no public address known yet; entry pending");
    }
    if config.dry_run {
        let text = match backend.dry_run(&table.rules, false) {
            Err(FirewallError::Netlink(
                NetlinkError::Refused { errno, .. } | NetlinkError::Socket(errno),
            )) if errno == nix::errno::Errno::EPERM => {
                eprintln!(
                    "# no CAP_NET_ADMIN: the kernel state cannot be read; assuming it is empty"
                );
                backend.dry_run(&table.rules, true)?
            }
            r => r?,
        };
        if text.is_empty() {
            println!("# no changes: the kernel already holds this NAT table");
        } else {
            print!("{text}");
        }
        return Ok(());
    }
    let report = backend
        .apply(&table.rules)
        .context("applying the NAT table")?;
    tracing::info!(
        flavor = backend.name(),
        messages = report.messages,
        bytes = report.bytes,
        retries = report.retries,
        mappings = table.rules.dnat.len(),
        "applied"
    );
    Ok(())
}
