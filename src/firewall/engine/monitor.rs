//! Drift repair's ears: a NETLINK_NETFILTER socket of its own subscribed to
//! the nf_tables multicast group (NFNLGRP_NFTABLES). Every commit by anybody
//! arrives as one notification per object it touched, then NEWGEN with the
//! commit's generation id. The `Tracker` reads them and keeps only what
//! concerns the agent: a commit that touches nothing it owns (kube-proxy's
//! syncs, Docker, CNI plugins) wakes nothing and keeps the applier's cache
//! valid; the agent's own commits (recognized by the generation id their
//! batch was sent with) are not heard at all.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, setsockopt, sockopt, MsgFlags};

use crate::firewall::wire::netlink::{self, find_attr, sys, NetlinkError};

/// How often an idle watcher checks whether it should stop.
const IDLE_WAKEUP: Duration = Duration::from_millis(200);
/// Own commits remembered (normally one is in flight at a time).
const OWN_MEMORY: usize = 32;

/// Where the agent lives in nf_tables, as notifications name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub tables: Vec<TableInterest>,
}

/// One table the agent writes into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInterest {
    /// NFPROTO_IPV4 or NFPROTO_IPV6.
    pub family: u8,
    pub table: String,
    /// The whole table is the agent's (nftables flavor).
    pub whole: bool,
    /// The agent's own chains in it: any change to them or their rules.
    pub chains: Vec<String>,
    /// Chains holding the agent's jumps: their rules (positions count) and
    /// their deletion; not their updates (a policy change moves nothing).
    pub parents: Vec<String>,
}

/// Why the watcher rang.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reasons {
    /// A foreign commit changed something the agent owns (or notifications
    /// were lost): the kernel must be read again and repaired.
    pub ours: bool,
    /// A foreign base chain at the forward hook was created, changed or may
    /// have gone: the forward-drop check should run again.
    pub forward_hook: bool,
}

impl Reasons {
    fn merge(&mut self, o: Reasons) {
        self.ours |= o.ours;
        self.forward_hook |= o.forward_hook;
    }
}

impl Interest {
    /// Whether `family`'s forward hook sees the traffic the agent forwards:
    /// that of a family it writes rules for, or inet (both).
    pub fn forwards(&self, family: u8) -> bool {
        forwarding_family(family, self.tables.iter().map(|t| t.family))
    }

    /// What one notification means for the agent.
    fn classify(&self, msg_type: u16, family: u8, attrs: &[u8], blockers: &[Blocker]) -> Reasons {
        let mut r = Reasons::default();
        let table = name_attr(attrs, 1); // every object names its table first
        if is_chain(msg_type) && table.is_some() {
            let hook = find_attr(attrs, sys::NFTA_CHAIN_HOOK)
                .and_then(|h| netlink::attr_be32(h, sys::NFTA_HOOK_HOOKNUM));
            let at_forward = hook == Some(libc::NF_INET_FORWARD as u32);
            let known = blockers.iter().any(|b| {
                b.family == family
                    && Some(b.table.as_bytes()) == table
                    && Some(b.chain.as_bytes()) == name_attr(attrs, sys::NFTA_CHAIN_NAME)
            });
            // Only a change of the answer counts: kube-proxy re-adds its
            // forward chain (policy accept) on every sync, which changes
            // nothing. A deleted chain's notification carries no hook, so
            // known blockers are recognized by name.
            let drops =
                netlink::attr_be32(attrs, sys::NFTA_CHAIN_POLICY) == Some(libc::NF_DROP as u32);
            r.forward_hook = if msg_type == sys::NFT_MSG_DELCHAIN as u16 {
                known
            } else {
                at_forward && self.forwards(family) && drops != known
            };
        }
        if msg_type == sys::NFT_MSG_DELTABLE as u16 {
            r.forward_hook = blockers
                .iter()
                .any(|b| b.family == family && Some(b.table.as_bytes()) == table);
        }
        let Some(t) = self
            .tables
            .iter()
            .find(|t| t.family == family && Some(t.table.as_bytes()) == table)
        else {
            return r;
        };
        r.ours = if t.whole || is_table(msg_type) {
            true
        } else if is_chain(msg_type) {
            let chain = name_attr(attrs, sys::NFTA_CHAIN_NAME);
            let named = |v: &[String]| v.iter().any(|c| Some(c.as_bytes()) == chain);
            named(&t.chains) || (msg_type == sys::NFT_MSG_DELCHAIN as u16 && named(&t.parents))
        } else if is_rule(msg_type) {
            let chain = name_attr(attrs, sys::NFTA_RULE_CHAIN);
            t.chains
                .iter()
                .chain(&t.parents)
                .any(|c| Some(c.as_bytes()) == chain)
        } else {
            false
        };
        r
    }
}

fn is_table(t: u16) -> bool {
    t == sys::NFT_MSG_NEWTABLE as u16 || t == sys::NFT_MSG_DELTABLE as u16
}
fn is_chain(t: u16) -> bool {
    t == sys::NFT_MSG_NEWCHAIN as u16 || t == sys::NFT_MSG_DELCHAIN as u16
}
fn is_rule(t: u16) -> bool {
    t == sys::NFT_MSG_NEWRULE as u16 || t == sys::NFT_MSG_DELRULE as u16
}
/// Whether `family`'s forward hook sees the traffic of the families the
/// agent serves (`served`: NFPROTO_IPV4 / NFPROTO_IPV6): one of them, or inet.
pub fn forwarding_family(family: u8, mut served: impl Iterator<Item = u8>) -> bool {
    family == libc::NFPROTO_INET as u8 || served.any(|f| f == family)
}

/// A NUL-terminated name attribute's bytes.
fn name_attr(attrs: &[u8], ty: u16) -> Option<&[u8]> {
    find_attr(attrs, ty).map(|p| &p[..p.iter().position(|&b| b == 0).unwrap_or(p.len())])
}

/// A foreign base chain at the forward hook with policy drop: it drops what
/// the agent accepts in a chain of its own (an accept ends only its chain).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blocker {
    pub family: u8,
    pub table: String,
    pub chain: String,
}

impl Blocker {
    pub fn family_name(&self) -> &'static str {
        match self.family as i32 {
            libc::NFPROTO_IPV4 => "ip",
            libc::NFPROTO_IPV6 => "ip6",
            libc::NFPROTO_INET => "inet",
            _ => "other",
        }
    }
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table {} {} chain {}",
            self.family_name(),
            self.table,
            self.chain
        )
    }
}

/// What one commit did, collected until its NEWGEN.
#[derive(Default)]
struct TrackerState {
    buf: Vec<u8>,
    /// The generation of the last NEWGEN read.
    seen: Option<u32>,
    /// Moves whenever a foreign commit touched what the agent owns, or
    /// notifications were lost: a cached kernel state from an older epoch
    /// must be read again.
    epoch: u64,
    /// This commit (until its NEWGEN) so far.
    commit: Reasons,
    /// Generation ids the agent's batches will produce or produced, with
    /// what the commit did once its NEWGEN was read (ignored as own).
    own: VecDeque<(u32, Option<Reasons>)>,
    /// Rung but not yet taken by the loop.
    pending: Reasons,
    blockers: Vec<Blocker>,
    commits_seen: u64,
    commits_ignored_own: u64,
}

/// The reader of the subscribed socket, shared by the watcher thread (which
/// wakes the loop) and the applier (which drains it before trusting its
/// cache, so no commit already made is missed).
pub struct Tracker {
    fd: OwnedFd,
    interest: Interest,
    state: Mutex<TrackerState>,
    /// Rung whenever a reason is added (never blocks: it only wakes).
    notify: Box<dyn Fn() + Send + Sync>,
}

/// Counters for tests and the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    pub commits_seen: u64,
    pub commits_ignored_own: u64,
    pub epoch: u64,
}

impl Tracker {
    /// Subscribes in the calling thread's network namespace.
    pub fn subscribe(
        interest: Interest,
        notify: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Tracker, NetlinkError> {
        let fd = netlink::open_netfilter_socket(1 << (sys::NFNLGRP_NFTABLES - 1))?;
        // Room for a large batch's notifications; an overrun is still seen
        // (ENOBUFS) and handled as "anything may have changed".
        let bytes = 8usize << 20;
        if setsockopt(&fd, sockopt::RcvBufForce, &bytes).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &bytes);
        }
        Ok(Tracker {
            fd,
            interest,
            notify,
            state: Mutex::new(TrackerState {
                buf: vec![0u8; 256 * 1024],
                ..TrackerState::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads every queued notification; what it found is added to the
    /// pending reasons. Errors other than an overrun are returned.
    fn drain(&self, st: &mut TrackerState) -> Result<(), Errno> {
        let mut buf = std::mem::take(&mut st.buf);
        let r = self.drain_into(st, &mut buf);
        st.buf = buf;
        r
    }

    fn drain_into(&self, st: &mut TrackerState, buf: &mut [u8]) -> Result<(), Errno> {
        loop {
            let n = match socket::recv(self.fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::ENOBUFS) => {
                    // Lost notifications: nothing cached can be trusted.
                    st.epoch += 1;
                    st.commit = Reasons::default();
                    self.add_reasons(
                        st,
                        Reasons {
                            ours: true,
                            forward_hook: true,
                        },
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            for m in netlink::parse_all(&buf[..n]) {
                self.process(st, m.msg_type, m.family, m.attrs);
            }
        }
    }

    fn process(&self, st: &mut TrackerState, msg_type: u16, family: u8, attrs: &[u8]) {
        if msg_type >> 8 != libc::NFNL_SUBSYS_NFTABLES as u16 {
            return;
        }
        let t = msg_type & 0xff;
        if t != sys::NFT_MSG_NEWGEN as u16 {
            let r = self.interest.classify(t, family, attrs, &st.blockers);
            st.commit.merge(r);
            return;
        }
        let Some(genid) = netlink::attr_be32(attrs, sys::NFTA_GEN_ID) else {
            return;
        };
        let commit = std::mem::take(&mut st.commit);
        st.seen = Some(genid);
        st.commits_seen += 1;
        if let Some(slot) = st.own.iter_mut().find(|(g, r)| *g == genid && r.is_none()) {
            slot.1 = Some(commit);
            st.commits_ignored_own += 1;
            return;
        }
        if commit.ours {
            st.epoch += 1;
        }
        self.add_reasons(st, commit);
    }

    /// Adds reasons to what the loop will take, and rings for them.
    fn add_reasons(&self, st: &mut TrackerState, r: Reasons) {
        if r != Reasons::default() {
            st.pending.merge(r);
            (self.notify)();
        }
    }

    /// Before sending a batch made against generation `generation`: the
    /// commit it makes, if the kernel takes it, is the next generation.
    pub fn expect_own(&self, generation: u32) -> u32 {
        let next = next_generation(generation);
        let mut st = self.lock();
        if st.own.len() >= OWN_MEMORY {
            st.own.pop_front();
        }
        st.own.push_back((next, None));
        next
    }

    /// The batch for `genid` was refused: that generation, if it was ever
    /// committed, was somebody else's, and counts as such.
    pub fn not_own(&self, genid: u32) {
        let mut st = self.lock();
        if let Some(i) = st.own.iter().position(|(g, _)| *g == genid) {
            if let Some((_, Some(commit))) = st.own.remove(i) {
                if commit.ours {
                    st.epoch += 1;
                }
                self.add_reasons(&mut st, commit);
            }
        }
    }

    /// Drains what is queued and returns the epoch: a cache filled after
    /// this call stays valid while the epoch does not move.
    pub fn catch_up(&self) -> u64 {
        let mut st = self.lock();
        if let Err(e) = self.drain(&mut st) {
            tracing::warn!("reading nf_tables notifications failed: {e}");
            st.epoch += 1;
        }
        st.epoch
    }

    /// Whether a kernel state cached at `epoch` still holds at the current
    /// `generation`: every commit up to it was read, none touched ours.
    pub fn still_valid(&self, epoch: u64, generation: u32) -> bool {
        let mut st = self.lock();
        if self.drain(&mut st).is_err() {
            st.epoch += 1;
            return false;
        }
        st.epoch == epoch && st.seen == Some(generation)
    }

    /// The generation of the newest commit read (call `catch_up` first).
    pub fn seen(&self) -> Option<u32> {
        self.lock().seen
    }

    /// The reasons rung since the last call.
    pub fn take_reasons(&self) -> Reasons {
        std::mem::take(&mut self.lock().pending)
    }

    /// The blockers last reported: their deletion rings for a re-check.
    pub fn set_blockers(&self, blockers: &[Blocker]) {
        self.lock().blockers = blockers.to_vec();
    }

    pub fn stats(&self) -> TrackerStats {
        let st = self.lock();
        TrackerStats {
            commits_seen: st.commits_seen,
            commits_ignored_own: st.commits_ignored_own,
            epoch: st.epoch,
        }
    }

    /// Waits up to `timeout` for the socket to become readable.
    fn readable(&self, timeout: Duration) -> Result<bool, Errno> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => Ok(n > 0),
            Err(Errno::EINTR) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Drains what is queued (rings for what it finds).
    fn drain_now(&self) -> Result<(), Errno> {
        let mut st = self.lock();
        self.drain(&mut st)
    }
}

/// The generation a commit on top of `g` produces (the kernel skips 0).
pub fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

/// A running watcher; stops (and joins its thread) when stopped or dropped.
pub struct RulesetWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    tracker: Arc<Tracker>,
}

impl RulesetWatch {
    /// The tracker the applier consults and the loop takes reasons from.
    pub fn tracker(&self) -> Arc<Tracker> {
        Arc::clone(&self.tracker)
    }

    /// Stops the watcher and waits for its thread (at most ~200 ms).
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// The watcher's thread ended (it ends only when stopped, or when the
    /// socket fails; the failure is logged).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RulesetWatch {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Subscribes to nf_tables notifications in the calling thread's network
/// namespace and calls `notify` (on the watcher's own thread) after a
/// foreign commit that concerns `interest` or the forward hook.
/// `notify` should only wake the loop; the reasons are in
/// `Tracker::take_reasons`.
pub fn watch_ruleset(
    interest: Interest,
    notify: impl Fn() + Send + Sync + 'static,
) -> Result<RulesetWatch, NetlinkError> {
    let tracker = Arc::new(Tracker::subscribe(interest, Box::new(notify))?);
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, tracker2) = (Arc::clone(&stop), Arc::clone(&tracker));
    let thread = std::thread::Builder::new()
        .name("ruleset-watch".into())
        .spawn(move || run(&tracker2, &stop2))
        .map_err(|e| NetlinkError::Socket(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    Ok(RulesetWatch {
        stop,
        thread: Some(thread),
        tracker,
    })
}

/// Reads notifications as they come; the tracker rings for what concerns
/// the agent. Bursts are the loop's to coalesce (`coalesce::Coalescer`).
fn run(tracker: &Tracker, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let r = tracker.readable(IDLE_WAKEUP).and_then(|readable| {
            if readable {
                tracker.drain_now()
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            tracing::error!("ruleset watcher stopped: netlink receive failed: {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests;
