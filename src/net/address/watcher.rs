//! Reading the node's links and addresses over rtnetlink, once or on every
//! link/address event, and publishing the choice.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{choose, AddrFacts, AddressError, AddressFilter, Choice, LinkFacts};
use crate::coalesce::Coalescer;

/// How long the watcher lets a burst of events settle before it re-reads:
/// one `ip addr replace` or a link flap sends several messages, and one
/// re-read covers them all.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// ...but no longer than this under a constant stream of events.
const MAX_DELAY: Duration = Duration::from_millis(200);

/// Back-off bounds for re-reading after a failed dump.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Reads links and addresses once, on a connection of its own, and chooses.
/// Runs in the network namespace of the calling thread.
pub async fn detect_once(filter: &AddressFilter) -> Result<Choice, AddressError> {
    let (conn, handle, _events) =
        rtnetlink::new_connection().map_err(|source| AddressError::Socket { source })?;
    // The connection is a future that moves the messages; driving it here
    // rather than spawning it means it is gone when this returns.
    tokio::select! {
        choice = read_choice(&handle, filter) => choice,
        () = conn => Err(AddressError::ConnectionClosed),
    }
}

async fn read_choice(handle: &Handle, filter: &AddressFilter) -> Result<Choice, AddressError> {
    let links: Vec<LinkFacts> = handle
        .link()
        .get()
        .execute()
        .map_ok(|m| LinkFacts::from_message(&m))
        .try_collect()
        .await
        .map_err(|source| AddressError::DumpLinks { source })?;
    let mut request = handle.address().get();
    // Ask the kernel for IPv4 only when IPv6 is not served, instead of
    // dumping every family.
    let families = filter.families();
    request.message_mut().header.family = match (families.ipv4, families.ipv6) {
        (true, false) => AddressFamily::Inet,
        (false, true) => AddressFamily::Inet6,
        _ => AddressFamily::Unspec,
    };
    let addrs: Vec<AddrFacts> = request
        .execute()
        .try_filter_map(|m| futures::future::ready(Ok(AddrFacts::from_message(&m))))
        .try_collect()
        .await
        .map_err(|source| AddressError::DumpAddresses { source })?;
    Ok(choose(&links, &addrs, filter))
}

/// Subscribes to link and IPv4 address events, reads the current choice, and
/// spawns a task that re-reads after every burst of events and publishes the
/// result. Must run inside a tokio runtime; the socket belongs to the network
/// namespace of the calling thread.
///
/// The receiver starts with a real reading, never a placeholder `None`, so a
/// consumer cannot tear rules down just because it started first. Receivers
/// are woken only when [`Choice::chosen`] changes; the skipped list in the
/// channel is kept current without waking anyone.
///
/// The task ends with `Ok(())` once every receiver is dropped, and with
/// [`AddressError::ConnectionClosed`] if the kernel connection goes away;
/// a failed re-read is logged and retried, keeping the previous choice.
pub async fn spawn_watcher(
    filter: AddressFilter,
) -> Result<(watch::Receiver<Choice>, WatcherTask), AddressError> {
    let mut groups = vec![MulticastGroup::Link];
    if filter.families().ipv4 {
        groups.push(MulticastGroup::Ipv4Ifaddr);
    }
    if filter.families().ipv6 {
        groups.push(MulticastGroup::Ipv6Ifaddr);
    }
    let (conn, handle, events) = rtnetlink::new_multicast_connection(&groups)
        .map_err(|source| AddressError::Subscribe { source })?;
    let conn = tokio::spawn(conn);
    // Subscribed before the first read: a change racing with it still sends
    // an event, so it cannot be missed.
    let first = match read_choice(&handle, &filter).await {
        Ok(choice) => choice,
        Err(e) => {
            conn.abort();
            return Err(e);
        }
    };
    tracing::info!(public_address = %first, "public address detected");
    let (tx, rx) = watch::channel(first);
    let task = tokio::spawn(async move {
        let result = follow(&handle, events, &filter, &tx, &conn).await;
        conn.abort();
        result
    });
    Ok((rx, task))
}

/// The watcher's task: it ends only when nobody listens any more (`Ok`) or
/// the kernel connection is gone (`Err`), so `main` can treat its end as
/// fatal.
pub type WatcherTask = JoinHandle<Result<(), AddressError>>;

type Events = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
)>;

async fn follow(
    handle: &Handle,
    mut events: Events,
    filter: &AddressFilter,
    tx: &watch::Sender<Choice>,
    conn: &JoinHandle<()>,
) -> Result<(), AddressError> {
    loop {
        // Which event it was does not matter: any of them (an overrun
        // included) means "read again".
        tokio::select! {
            () = tx.closed() => return Ok(()),
            event = events.next() => if event.is_none() {
                return Err(AddressError::ConnectionClosed);
            },
        }
        // Let the burst end (one re-read covers it); a closed stream shows on
        // the next turn of the loop.
        let mut burst = Coalescer::new(tokio::time::Instant::now(), DEBOUNCE, MAX_DELAY);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(burst.deadline()) => break,
                event = events.next() => match event {
                    Some(_) => burst.poke(tokio::time::Instant::now()),
                    None => break,
                },
            }
        }

        let mut delay = RETRY_MIN;
        let choice = loop {
            match read_choice(handle, filter).await {
                Ok(choice) => break choice,
                Err(e) => {
                    if conn.is_finished() {
                        return Err(AddressError::ConnectionClosed);
                    }
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot re-read the node's addresses; keeping the previous public address");
                    tokio::select! {
                        () = tx.closed() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        };
        publish(tx, choice);
    }
}

fn publish(tx: &watch::Sender<Choice>, choice: Choice) {
    let previous = tx.borrow().chosen;
    if previous != choice.chosen {
        tracing::info!(
            previous = %previous,
            public_address = %choice,
            "public address changed"
        );
    }
    tx.send_if_modified(move |current| {
        let changed = current.chosen != choice.chosen;
        *current = choice;
        changed
    });
}
