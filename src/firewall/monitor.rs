//! Drift repair's ears: a NETLINK_NETFILTER socket of its own subscribed to
//! the nf_tables multicast group (NFNLGRP_NFTABLES), so any commit by
//! anybody — a flushed chain, a deleted rule, a moved jump — wakes the
//! reconcile loop within milliseconds; its minimal diff repairs what drifted.
//!
//! The agent's own commits are heard too. That settles by itself: the apply
//! after a self-caused notification finds the generation it remembered and
//! an empty diff, so it sends nothing and causes no further notification.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, setsockopt, sockopt, MsgFlags};
use nix::sys::time::TimeVal;

use super::netlink::{sys, NetlinkError};

/// A burst of notifications (one batch is one message per object plus
/// NEWGEN) becomes one signal once the socket has been quiet this long...
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// ...or at the latest this long after the burst began.
pub const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often an idle watcher checks whether it should stop.
const IDLE_WAKEUP: Duration = Duration::from_millis(200);

/// A running watcher; stops (and joins its thread) when stopped or dropped.
pub struct RulesetWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RulesetWatch {
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
/// namespace and calls `notify` (on the watcher's own thread, debounced)
/// after any change to any table. Blocking work belongs elsewhere: `notify`
/// should only wake the loop (send on a channel, notify a `Notify`).
pub fn watch_ruleset(notify: impl Fn() + Send + 'static) -> Result<RulesetWatch, NetlinkError> {
    let fd = subscribe()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("ruleset-watch".into())
        .spawn(move || run(fd, &stop2, notify))
        .map_err(|e| NetlinkError::Socket(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    Ok(RulesetWatch {
        stop,
        thread: Some(thread),
    })
}

fn subscribe() -> Result<OwnedFd, NetlinkError> {
    let fd = super::netlink::open_netfilter_socket(1 << (sys::NFNLGRP_NFTABLES - 1))?;
    // Room for a large batch's notifications; an overrun is still a signal.
    let bytes = 4usize << 20;
    if setsockopt(&fd, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(&fd, sockopt::RcvBuf, &bytes);
    }
    Ok(fd)
}

/// Waits up to `timeout` for notifications and drains what arrived; true if
/// anything did (an overrun, ENOBUFS, counts: messages were lost).
fn wait(fd: &OwnedFd, buf: &mut [u8], timeout: Duration) -> Result<bool, Errno> {
    setsockopt(
        fd,
        sockopt::ReceiveTimeout,
        &TimeVal::from(libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        }),
    )?;
    let mut got = false;
    let mut flags = MsgFlags::empty();
    loop {
        match socket::recv(fd.as_raw_fd(), buf, flags) {
            Ok(_) | Err(Errno::ENOBUFS) => got = true,
            Err(Errno::EAGAIN) => return Ok(got),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
        // After the first message, only drain what is queued already.
        flags = MsgFlags::MSG_DONTWAIT;
    }
}

fn run(fd: OwnedFd, stop: &AtomicBool, notify: impl Fn()) {
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match wait(&fd, &mut buf, IDLE_WAKEUP) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::error!("ruleset watcher stopped: netlink receive failed: {e}");
                return;
            }
        }
        let burst = Instant::now();
        while burst.elapsed() < MAX_DELAY {
            match wait(&fd, &mut buf, DEBOUNCE) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::error!("ruleset watcher stopped: netlink receive failed: {e}");
                    return;
                }
            }
        }
        notify();
    }
}
