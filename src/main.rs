//! Wiring only: flags → config → the chosen mode (cleanup, one run for a
//! pods file, or the agent: pod watch + address + reconcile loop).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::error::ErrorKind;
use podnat_controller::config::{Command, Config, TlsSource};
use podnat_controller::firewall::engine::{coexist, monitor};
use podnat_controller::firewall::wire::netlink::NetlinkError;
use podnat_controller::firewall::{backend_counting, cleanup, Backend, FirewallError, Names};
use podnat_controller::http::access::{self, Access};
use podnat_controller::http::review::ApiserverReviewer;
use podnat_controller::http::{self, AddressSource, HttpContext};
use podnat_controller::kube::events::EventSink;
use podnat_controller::kube::namespace::NamespaceRules;
use podnat_controller::kube::watch::{self, PodWatchConfig};
use podnat_controller::kube::{self, pod};
use podnat_controller::model::DualStack;
use podnat_controller::net::address::{self, AddressFilter};
use podnat_controller::plan::{self, PlanConfig};
use podnat_controller::reconcile::{
    self, AgentStatus, BackendWorker, Drift, ReconcileConfig, Reconciler,
};
use podnat_controller::state::{self, RecorderOptions};

fn main() -> ExitCode {
    limit_malloc_arenas();
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

/// glibc gives each thread that allocates its own arena (up to 8 per core);
/// the agent's threads (runtime workers, firewall, monitor, address watch)
/// then keep freed memory in several heaps (a second runtime worker's held
/// ~16 MB after a burst). One arena: the threads rarely allocate at once,
/// and `malloc_trim` after a burst reaches all of the freed memory
/// (benches/latency prints the resident set).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called first thing
    // in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// How often the heap trim looks whether the loop worked since its last trim.
const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Hands the heap's free pages back to the kernel after the loop worked.
/// glibc returns only the free top of the heap; a burst (a relist, a
/// thousand pods at once) leaves its freed lists, JSON pages and tables
/// scattered below live data, resident for good: 7–14 MB after a 1000-pod
/// burst (benches/latency, BENCHMARKS.md "footprint"). `malloc_trim`
/// releases the free pages inside the heap too; an idle agent never pays
/// for it. Never returns.
async fn release_freed_heap(status: Arc<AgentStatus>) {
    let mut seen = 0;
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let passes = status
            .counters
            .reconciled
            .load(std::sync::atomic::Ordering::Relaxed);
        if passes != seen {
            seen = passes;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim takes the allocator's own locks; it only
            // returns free pages to the kernel.
            unsafe {
                libc::malloc_trim(0);
            }
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
    if config.iptables_counters && config.flavor == podnat_controller::config::Flavor::Nftables {
        tracing::warn!(
            "-iptablescounters has no effect in the nftables flavor: it counts every mapping anyway"
        );
    }
    let mut backend = backend_counting(
        config.flavor,
        names.clone(),
        config.jump,
        config.families,
        config.local_access,
        config.iptables_counters,
    );
    if let Some(Command::Cleanup { for_go_version }) = config.command {
        if config.dry_run && for_go_version {
            anyhow::bail!(
                "cleanup --for-go-version has no dry run: `cleanup -dryrun` lists everything the agent owns"
            );
        }
        let removed = if for_go_version {
            cleanup::for_go_version(&names, config.jump).context("cleanup --for-go-version")?
        } else {
            cleanup::everything(&names, config.dry_run).context("cleanup")?
        };
        if removed.is_empty() {
            println!("nothing of the agent's was found");
        }
        let verb = if config.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for line in removed {
            println!("{verb} {line}");
        }
        return Ok(());
    }
    let node_id = config
        .node_id
        .clone()
        .context("no node id: pass -nodeid NODE or set NODE_NAME (or HOSTNAME)")?;
    let Some(pods_file) = config.pods_file.clone() else {
        return run_agent(config, node_id, backend);
    };
    let pods = pod::read_pods_file(&pods_file)?;
    if !config.namespace_selector.selects_all() {
        tracing::warn!("a pods file carries no namespaces: -namespaceselector and namespace ports annotations are not checked in this run");
    }
    let facts: Vec<_> = pods
        .iter()
        .map(|p| pod::facts(p, &config.annotation_key))
        .collect();
    let public_address = match config.public_address {
        Some(a) => a,
        None => detect_public_address(&config)?,
    };
    // The node's own services, as the agent reads them before each plan.
    let services = if config.guard_node_ports {
        podnat_controller::net::sockets::node_services(config.families)?
    } else {
        Default::default()
    };
    let table = plan::plan_with(
        &facts,
        public_address,
        &services,
        &PlanConfig {
            node_id,
            restricted_ports: config.restricted_ports.clone(),
            families: config.families,
            local_access: config.local_access,
            source_ranges: podnat_controller::firewall::enforces_source_ranges(config.flavor),
        },
    );
    for r in &table.rejected {
        tracing::warn!(pod = %r.pod, "{}", r.rejected);
    }
    for c in &table.conflicts {
        tracing::warn!(pod = %c.loser, "{} is taken by {}", c.ports(), c.winner);
    }
    for p in &table.pending {
        tracing::warn!(pod = %p.pod, entry = p.entry, family = %p.family, "no public address known yet; entry pending");
    }
    for r in &table.refused {
        tracing::warn!(pod = %r.pod, entry = r.entry, reason = r.reason.metric_label(), "not published: {r}");
    }
    warn_forward_blockers(backend.as_mut());
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
    let mut report = backend
        .apply(&table.rules)
        .context("applying the NAT table")?;
    podnat_controller::firewall::flush_stale_connections(&mut report);
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

/// One-shot mode's forward-hook check (the agent does it at each resync).
fn warn_forward_blockers(backend: &mut dyn Backend) {
    match backend.forward_blockers() {
        Ok(found) => {
            for b in &found {
                tracing::warn!(
                    family = b.family_name(),
                    table = %b.table,
                    chain = %b.chain,
                    "{}",
                    coexist::advice(backend.name(), b)
                );
            }
        }
        // Without CAP_NET_ADMIN (a dry run as a user) nothing can be read.
        Err(e) => tracing::debug!("cannot look for foreign forward-hook drop policies: {e}"),
    }
}

/// The one-shot mode's public address without `--public-address`: one
/// rtnetlink dump, chosen by the agent's own detection (same filters, same
/// skip reasons, logged whatever the outcome).
fn detect_public_address(config: &Config) -> anyhow::Result<DualStack> {
    let filter = AddressFilter::new(&config.incl_filter_net, &config.excl_filter_net)
        .with_families(config.families);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let choice = runtime
        .block_on(address::detect_once(&filter))
        .context("detecting the public address")?;
    for family in config.families.iter() {
        match choice.chosen.get(family) {
            Some(_) => tracing::info!(public_address = %choice, %family, "public address detected"),
            None => tracing::warn!(
                public_address = %choice,
                %family,
                "no public address qualifies; auto entries stay pending"
            ),
        }
    }
    Ok(choice.chosen)
}

/// Agent mode: watch this node's pods and keep the kernel in step until
/// SIGTERM/SIGINT.
fn run_agent(config: Config, node_id: String, backend: Box<dyn Backend>) -> anyhow::Result<()> {
    // Two workers: on one thread the state writer's serialization of the
    // record delays the next pass (p50 pod → kernel 19.7 ms instead of
    // 11.5 ms at 5,000 ports, benches/latency). The second worker's own
    // malloc arena held ~16 MB after a 1000-pod burst: one arena for every
    // thread (`limit_malloc_arenas`) costs 1 MB against one thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(agent(config, node_id, backend));
    // Tasks still running (watch, events) are cut off; the rules stay.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn agent(config: Config, node_id: String, backend: Box<dyn Backend>) -> anyhow::Result<()> {
    // Bound first: a taken port stops the agent before it does anything.
    let listener = http::bind(std::net::SocketAddr::new(
        config.http.address,
        config.http_port,
    ))
    .await?;
    // Made (or read) before anything runs, so a bad certificate stops the
    // agent with its reason.
    let tls = config
        .http
        .auth
        .then(|| http::server_config(&config.http.tls, &certificate_names(&config, &node_id)))
        .transpose()?
        .map(tokio_rustls::TlsAcceptor::from);
    let (client, _) = kube::connect(config.kubeconfig.as_deref()).await?;
    // -dryrun touches nothing: the state store is neither read nor written.
    let state_store = if config.dry_run {
        tracing::info!("-dryrun: the state store is neither read nor written");
        None
    } else {
        Some(state::store_for(
            config.state_flavor,
            &config.state_uri,
            &node_id,
            &client,
        )?)
    };
    // The sender of a fixed address must outlive the loop.
    let (_fixed, address) = match config.public_address {
        Some(a) => {
            tracing::info!(public_address = %a, "public address given by --public-address");
            let (tx, rx) = reconcile::fixed_address(a);
            (Some(tx), rx)
        }
        None => {
            let filter = AddressFilter::new(&config.incl_filter_net, &config.excl_filter_net)
                .with_families(config.families);
            let (rx, _task) = address::spawn_watcher(filter)
                .await
                .context("detecting the public address")?;
            (None, rx)
        }
    };
    // Tasks beside the loop; if one ends, the agent stops (see `supervise`).
    let mut tasks = Vec::new();
    let (feed, watch_task) = watch::spawn_pod_watcher(
        client.clone(),
        PodWatchConfig {
            node: node_id.clone(),
            exact: config.node_id_exact,
            annotation_key: config.annotation_key.clone(),
        },
    );
    tasks.push(("pod watch", watch_task));
    // Namespaces: the admin's selector and ports annotations.
    if !config.namespace_selector.selects_all() {
        tracing::info!(selector = %config.namespace_selector, "only pods in namespaces that match -namespaceselector publish");
    }
    let (namespaces, ns_task) = podnat_controller::kube::namespace::spawn_namespace_watcher(
        client.clone(),
        NamespaceRules::new(config.namespace_selector.clone(), &config.annotation_key),
    );
    tasks.push(("namespace watch", ns_task));
    let access = config.http.auth.then(|| {
        Arc::new(Access::new(Arc::new(ApiserverReviewer::new(
            client.clone(),
        ))))
    });
    let events = if config.dry_run {
        EventSink::log_only()
    } else {
        let (sink, task) = EventSink::spawn(client, node_id.clone());
        tasks.push(("Kubernetes events", task));
        sink
    };
    let status = Arc::new(AgentStatus::new(events.stats()));
    tasks.push((
        "heap trim",
        tokio::spawn(release_freed_heap(status.clone())),
    ));
    // The store runs on a task of its own: a slow or unreachable store never
    // delays NAT; its failures are logged and counted in the status.
    let recorder = state_store.map(|store| {
        let (recorder, stats, task) = state::spawn(store, RecorderOptions::default());
        status.set_state_stats(stats);
        tasks.push(("state store", task));
        recorder
    });
    let endpoints = Endpoints {
        listener,
        tls,
        access,
    };
    tasks.push(("HTTP", spawn_http(endpoints, &config, &node_id, &status)));
    // Drift repair: foreign commits that touch what the agent owns wake the
    // loop; its own commits and everybody else's (kube-proxy's) do not, and
    // leave the backend's cache valid. Subscribed before the first read so
    // no commit is missed. Not in dry run, which must not react to the kernel.
    let mut backend = backend;
    let watch = if config.dry_run {
        None
    } else {
        let bell = Arc::new(tokio::sync::Notify::new());
        let ring = Arc::clone(&bell);
        let watch = monitor::watch_ruleset(backend.interest(), move || ring.notify_one())
            .context("subscribing to nf_tables notifications (drift repair)")?;
        backend.attach_tracker(watch.tracker());
        Some((bell, watch))
    };
    let drift = watch.as_ref().map(|(bell, w)| Drift {
        bell: Arc::clone(bell),
        tracker: w.tracker(),
    });
    let backend = BackendWorker::spawn(backend)?;
    let reconciler = Reconciler::new(
        ReconcileConfig::new(&config, &node_id),
        feed,
        address,
        backend,
        events,
        status,
    )
    .with_state(recorder)
    .with_namespaces(Some(namespaces));
    let monitor_gone = async {
        match &watch {
            Some((_, w)) => {
                while !w.is_finished() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = reconciler.with_drift(drift).run(shutdown_signal()) => r?,
        e = supervise(tasks) => return Err(e),
        () = monitor_gone => anyhow::bail!(
            "the nf_tables monitor stopped (its error is logged above); stopping so that the agent is restarted"
        ),
    }
    drop(watch);
    Ok(())
}

/// Waits for the first of the long-lived tasks to end: none should while
/// the agent runs, so one that does stops the agent with its name (the
/// DaemonSet restarts it) instead of leaving it running half-deaf.
async fn supervise(tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>) -> anyhow::Error {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    let ends = tasks
        .into_iter()
        .map(|(name, task)| Box::pin(async move { (name, task.await) }));
    let ((name, result), _, _) = futures::future::select_all(ends).await;
    match result {
        Ok(()) => anyhow::anyhow!(
            "the {name} task ended unexpectedly; stopping so that the agent is restarted"
        ),
        Err(e) => {
            anyhow::anyhow!("the {name} task failed ({e}); stopping so that the agent is restarted")
        }
    }
}

/// The names a self-signed certificate is made for: the node's name, the
/// bind address when it is one, the public addresses when given, loopback.
fn certificate_names(config: &Config, node_id: &str) -> Vec<String> {
    let mut names = vec![node_id.to_string(), "localhost".to_string()];
    if !config.http.address.is_unspecified() {
        names.push(config.http.address.to_string());
    }
    if let Some(public) = &config.public_address {
        names.extend(public.iter().map(|ip| ip.to_string()));
    }
    names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The HTTP port as `agent` prepared it: bound, with its TLS configuration
/// and access checks unless -httpauth=false.
struct Endpoints {
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    access: Option<Arc<Access>>,
}

/// Serves the HTTP endpoints for as long as the runtime runs.
fn spawn_http(
    endpoints: Endpoints,
    config: &Config,
    node_id: &str,
    status: &Arc<AgentStatus>,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = endpoints.listener.local_addr() {
        let certificate = match &config.http.tls {
            TlsSource::Files { cert, .. } => cert.display().to_string(),
            TlsSource::SelfSigned => "self-signed".to_string(),
        };
        if endpoints.access.is_some() {
            tracing::info!(%addr, %certificate, "serving /healthz, /ready, /ping to anyone; /entries/list, /metrics to loopback, and to remote clients over TLS with a bearer token the apiserver allows");
        } else {
            tracing::info!(%addr, "serving /healthz, /ready, /ping, /entries/list, /metrics over plain HTTP to anyone (-httpauth=false)");
        }
    }
    let mut registry = podnat_controller::status::registry(status);
    if let Some(access) = &endpoints.access {
        access.metrics.register(&mut registry);
    }
    let ctx = HttpContext {
        registry,
        status: status.clone(),
        flavor: config.flavor,
        view: std::sync::Mutex::new(backend_counting(
            config.flavor,
            Names::new(&config.resource_prefix),
            config.jump,
            config.families,
            config.local_access,
            config.iptables_counters,
        )),
        node: node_id.to_string(),
        dry_run: config.dry_run,
        families: config.families,
        traffic: podnat_controller::firewall::TrafficSource::for_flavor(
            config.flavor,
            Names::new(&config.resource_prefix),
            config.families,
            config.iptables_counters,
        ),
        address_source: if config.public_address.is_some() {
            AddressSource::Flag
        } else {
            AddressSource::Detected
        },
    };
    let mut router = http::router(ctx);
    if let Some(access) = endpoints.access {
        router = access::guarded(router, access);
    }
    tokio::spawn(http::serve(endpoints.listener, router, endpoints.tls))
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or SIGINT.
async fn shutdown_signal() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
