//! nf_tables over netlink: attribute encoding, one batch per change, and a
//! socket of the project's own that sends the batch with the ruleset
//! generation id, collects the kernel's answers and pages through dumps.
//!
//! Why not only rustables: its 0.9 types encode tables and chains well (they
//! are used for those, see `NftBatch::add_table`/`add_chain`), but not what
//! this agent needs beyond them — 32-bit registers for concatenations, maps
//! (set data type/len), element data and comments, xt-compat matches and
//! targets, rule compat attributes, NFNL_BATCH_GENID — and its message trait
//! (`NfNetlinkObject`) lives in a crate-private module, so no message of ours
//! can go into its `Batch`. Its `Batch::send` also uses default socket
//! buffers. So rustables encodes its objects, their bytes are spliced into a
//! batch of ours, and the rest is encoded here.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, setsockopt, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

pub use rustables::sys;

const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP_INTR: u16 = 0x10;

/// Errors at the netlink boundary.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(#[source] Errno),
    #[error("netlink send failed: {0}")]
    Send(#[source] Errno),
    #[error("netlink receive failed: {0}")]
    Recv(#[source] Errno),
    #[error("the kernel refused {what}: {errno}")]
    Refused { what: String, errno: Errno },
    /// A refused message added without a description
    /// ([`NftBatch::add_undescribed`]); the applier turns it into
    /// `Refused` with the flavor's description of message `seq`.
    #[error("the kernel refused message {seq} of the batch: {errno}")]
    Undescribed { seq: u32, errno: Errno },
    #[error("the ruleset changed while the batch was built (generation {genid} is stale)")]
    GenerationChanged { genid: u32 },
    #[error("malformed netlink message from the kernel: {0}")]
    Malformed(String),
    #[error("a dump was interrupted by concurrent changes {0} times in a row")]
    DumpInterrupted(u32),
}

mod attrs;
mod batch;

use attrs::{align4, parse_msg};
pub use attrs::{
    attr_be32, attr_be64, attr_str, attr_str_is, find_attr, parse_all, parse_attrs, AttrIter,
    Attrs, RawMsg,
};
use batch::{nlmsg_header, patch_len};
pub use batch::{protocol_family, BatchBuffers, FinalBatch, NftBatch, NftMsg};

/// An nf_tables message the kernel echoed back after a commit.
#[derive(Clone, Debug)]
pub struct Echo {
    /// NFT_MSG_* (e.g. NFT_MSG_NEWRULE).
    pub msg_type: u32,
    /// The sequence number of the batch message it answers.
    pub seq: u32,
    /// NFTA_RULE_HANDLE of an echoed rule: all the agent reads of an echo
    /// (no copy of the rest: an install echoes thousands of rules).
    pub handle: Option<u64>,
}

/// A NETLINK_NETFILTER socket owned by the agent.
pub struct NfSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

/// A bound NETLINK_NETFILTER socket in the calling thread's namespace,
/// joined to the multicast `groups` (a bit mask; 0 for none).
pub fn open_netfilter_socket(groups: u32) -> Result<OwnedFd, NetlinkError> {
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(NetlinkError::Socket)?;
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).map_err(NetlinkError::Socket)?;
    Ok(fd)
}

/// The receive buffer: one datagram at a time — a dump part (the kernel
/// sizes them to the reader's buffer), an echo, or an error that quotes one
/// message of a batch (at most 64 KiB). Not grown with the batch: a buffer
/// sized to an install of 5,000 ports stayed resident (2 MB) for good.
const RECV_BUF: usize = 256 << 10;

impl NfSocket {
    pub fn open() -> Result<NfSocket, NetlinkError> {
        let fd = open_netfilter_socket(0)?;
        let s = NfSocket {
            fd,
            seq: 1,
            buf: vec![0u8; RECV_BUF],
        };
        s.size_buffers(4 << 20);
        Ok(s)
    }

    /// Raises send/receive buffers: the *FORCE options (CAP_NET_ADMIN) go past
    /// the sysctl limits, as nft does for large batches; fall back quietly.
    fn size_buffers(&self, bytes: usize) {
        let fd = self.fd.as_raw_fd();
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if setsockopt(&bfd, sockopt::SndBufForce, &bytes).is_err() {
            let _ = setsockopt(&bfd, sockopt::SndBuf, &bytes);
        }
        if setsockopt(&bfd, sockopt::RcvBufForce, &bytes).is_err() {
            let _ = setsockopt(&bfd, sockopt::RcvBuf, &bytes);
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send_all(&self, bytes: &[u8]) -> Result<(), NetlinkError> {
        let n = socket::send(self.fd.as_raw_fd(), bytes, MsgFlags::empty())
            .map_err(NetlinkError::Send)?;
        if n != bytes.len() {
            return Err(NetlinkError::Send(Errno::EMSGSIZE));
        }
        Ok(())
    }

    /// Receives one datagram (possibly several messages) into the buffer.
    fn recv(&mut self, flags: MsgFlags) -> Result<usize, Errno> {
        loop {
            match socket::recv(self.fd.as_raw_fd(), &mut self.buf, flags) {
                Err(Errno::EINTR) => continue,
                r => return r,
            }
        }
    }

    /// Sends a batch; the kernel processes it inside sendmsg, so every answer
    /// is queued when it returns. Success means no error for any message.
    pub fn send_batch(&mut self, batch: FinalBatch) -> Result<(), NetlinkError> {
        self.send_batch_collect(&batch, None)
    }

    /// Like `send_batch`, and returns what the kernel echoes for the
    /// messages sent with NLM_F_ECHO — a new rule comes back with its
    /// NFTA_RULE_HANDLE — plus the NEWGEN of the commit.
    pub fn send_batch_echo(&mut self, batch: &FinalBatch) -> Result<Vec<Echo>, NetlinkError> {
        let mut echoes = Vec::new();
        self.send_batch_collect(batch, Some(&mut echoes))?;
        Ok(echoes)
    }

    fn send_batch_collect(
        &mut self,
        batch: &FinalBatch,
        mut echoes: Option<&mut Vec<Echo>>,
    ) -> Result<(), NetlinkError> {
        let needed = batch.bytes.len() * 2 + (batch.what.len() * 64) + (1 << 20);
        self.size_buffers(needed.max(4 << 20));
        self.send_all(&batch.bytes)?;
        let mut first_error: Option<NetlinkError> = None;
        loop {
            let n = match self.recv(MsgFlags::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(n) => n,
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(NetlinkError::Recv(e)),
            };
            let mut off = 0;
            while off < n {
                let Some(msg) = parse_msg(&self.buf[off..n]) else {
                    break;
                };
                let start = off;
                off += align4(msg.total_len);
                if msg.msg_type != NLMSG_ERROR {
                    if let Some(e) = echoes.as_deref_mut() {
                        if msg.msg_type >> 8 == libc::NFNL_SUBSYS_NFTABLES as u16 {
                            let msg_type = (msg.msg_type & 0xff) as u32;
                            e.push(Echo {
                                msg_type,
                                seq: msg.seq,
                                handle: (msg_type == sys::NFT_MSG_NEWRULE)
                                    .then(|| attr_be64(msg.attrs, sys::NFTA_RULE_HANDLE))
                                    .flatten(),
                            });
                        }
                    }
                    continue;
                }
                if msg.total_len < NLMSG_HDRLEN + 4 {
                    continue;
                }
                // struct nlmsgerr { int error; struct nlmsghdr msg; ... }
                let raw = &self.buf[start + NLMSG_HDRLEN..start + msg.total_len];
                let code = i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                if code == 0 {
                    continue;
                }
                let orig_seq = raw
                    .get(12..16)
                    .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                let errno = Errno::from_raw(-code);
                let err = if errno == Errno::ERESTART {
                    NetlinkError::GenerationChanged {
                        genid: batch.genid.unwrap_or(0),
                    }
                } else {
                    match batch.what.get(orig_seq as usize) {
                        Some(what) if what.is_empty() => NetlinkError::Undescribed {
                            seq: orig_seq,
                            errno,
                        },
                        what => NetlinkError::Refused {
                            what: what
                                .cloned()
                                .unwrap_or_else(|| format!("message {orig_seq}")),
                            errno,
                        },
                    }
                };
                if first_error.is_none() {
                    first_error = Some(err);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends one request and collects the payloads (nfgenmsg-stripped
    /// attributes) of all answers until DONE (dump) or the single reply.
    fn request(
        &mut self,
        msg_type: u32,
        flags: u16,
        family: u8,
        attrs: &Attrs,
    ) -> Result<Vec<(u8, Vec<u8>)>, RequestError> {
        let seq = self.next_seq();
        let mut req = Vec::with_capacity(32 + attrs.len());
        let ty = ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | msg_type as u16;
        nlmsg_header(&mut req, ty, flags | libc::NLM_F_ACK as u16, seq, family, 0);
        req.extend_from_slice(attrs.as_bytes());
        patch_len(&mut req, 0);
        self.send_all(&req).map_err(RequestError::Netlink)?;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self
                .recv(MsgFlags::empty())
                .map_err(|e| RequestError::Netlink(NetlinkError::Recv(e)))?;
            let mut off = 0;
            while off < n {
                let Some(msg) = parse_msg(&self.buf[off..n]) else {
                    return Err(RequestError::Netlink(NetlinkError::Malformed(
                        "truncated message".into(),
                    )));
                };
                let start = off;
                off += align4(msg.total_len);
                if msg.seq != seq {
                    continue; // a stale answer to an earlier request
                }
                // Objects of another family are never ours (the kernel
                // filters most dumps by family too; this does not rely on it).
                if family != libc::AF_UNSPEC as u8
                    && msg.family != family
                    && msg.msg_type != NLMSG_DONE
                    && msg.msg_type != NLMSG_ERROR
                {
                    continue;
                }
                if msg.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match msg.msg_type {
                    NLMSG_DONE => {
                        return if interrupted {
                            Err(RequestError::Interrupted)
                        } else {
                            Ok(out)
                        };
                    }
                    NLMSG_ERROR => {
                        let raw = &self.buf[start + NLMSG_HDRLEN..];
                        let code = i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                        if code == 0 {
                            return Ok(out); // the ACK ends a non-dump request
                        }
                        return Err(RequestError::Errno(Errno::from_raw(-code)));
                    }
                    _ => out.push((msg.family, msg.attrs.to_vec())),
                }
            }
        }
    }

    /// Dumps all objects of `msg_type` (NFT_MSG_GET*) matching `filter`
    /// attributes, retrying when concurrent changes interrupt the dump.
    pub fn dump(
        &mut self,
        msg_type: u32,
        family: u8,
        filter: &Attrs,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        Ok(self
            .dump_families(msg_type, family, filter)?
            .into_iter()
            .map(|(_, m)| m)
            .collect())
    }

    /// Like `dump`, each object with its family (for dumps across families,
    /// `family` = AF_UNSPEC).
    pub fn dump_families(
        &mut self,
        msg_type: u32,
        family: u8,
        filter: &Attrs,
    ) -> Result<Vec<(u8, Vec<u8>)>, NetlinkError> {
        for _ in 0..10 {
            match self.request(msg_type, libc::NLM_F_DUMP as u16, family, filter) {
                Ok(v) => return Ok(v),
                Err(RequestError::Interrupted) => continue,
                Err(RequestError::Errno(e)) => {
                    return Err(NetlinkError::Refused {
                        what: format!("dump request {msg_type}"),
                        errno: e,
                    })
                }
                Err(RequestError::Netlink(e)) => return Err(e),
            }
        }
        Err(NetlinkError::DumpInterrupted(10))
    }

    /// Dumps the objects of `msg_type` (GETCHAIN, GETRULE, GETSET or
    /// GETSETELEM) inside `scope` only. The kernel narrows some dumps by the
    /// filter attributes and not others (a chain dump answers with every
    /// table's chains), so every answer is checked against the scope here:
    /// on a crowded node a foreign object must never look like ours.
    pub fn dump_scoped(
        &mut self,
        msg_type: u32,
        scope: &Scope<'_>,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let (table_attr, object_attr) = scope_attrs(msg_type);
        let mut filter = Attrs::new();
        filter.str(table_attr, scope.table);
        if let Some(o) = scope.object {
            filter.str(object_attr, o);
        }
        let mut all = self.dump(msg_type, scope.family, &filter)?;
        all.retain(|m| scope.holds(m, table_attr, object_attr));
        Ok(all)
    }

    /// `dump_scoped`; `Ok(None)` when the scope's table or object does not
    /// exist (ENOENT).
    pub fn dump_scoped_if_present(
        &mut self,
        msg_type: u32,
        scope: &Scope<'_>,
    ) -> Result<Option<Vec<Vec<u8>>>, NetlinkError> {
        match self.dump_scoped(msg_type, scope) {
            Ok(m) => Ok(Some(m)),
            Err(NetlinkError::Refused {
                errno: Errno::ENOENT,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Gets one object; `Ok(None)` when it does not exist (ENOENT).
    pub fn get(
        &mut self,
        msg_type: u32,
        family: u8,
        attrs: &Attrs,
    ) -> Result<Option<Vec<u8>>, NetlinkError> {
        match self.request(msg_type, 0, family, attrs) {
            Ok(mut v) => Ok(v.pop().map(|(_, m)| m)),
            Err(RequestError::Errno(Errno::ENOENT)) => Ok(None),
            Err(RequestError::Errno(e)) => Err(NetlinkError::Refused {
                what: format!("get request {msg_type}"),
                errno: e,
            }),
            Err(RequestError::Interrupted) => Err(NetlinkError::DumpInterrupted(1)),
            Err(RequestError::Netlink(e)) => Err(e),
        }
    }

    /// The ruleset generation (NFT_MSG_GETGEN): it moves with every commit.
    pub fn generation(&mut self) -> Result<u32, NetlinkError> {
        let reply = self
            .get(sys::NFT_MSG_GETGEN, libc::AF_UNSPEC as u8, &Attrs::new())?
            .ok_or_else(|| NetlinkError::Malformed("no answer to GETGEN".into()))?;
        attr_be32(&reply, sys::NFTA_GEN_ID)
            .ok_or_else(|| NetlinkError::Malformed("GETGEN without NFTA_GEN_ID".into()))
    }
}

/// What a scoped dump may return: one family, one table and, for rules and
/// set elements, one chain or set.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub family: u8,
    pub table: &'a str,
    pub object: Option<&'a str>,
}

impl<'a> Scope<'a> {
    pub fn table(family: u8, table: &'a str) -> Scope<'a> {
        Scope {
            family,
            table,
            object: None,
        }
    }

    /// A chain's rules or a set's elements.
    pub fn object(family: u8, table: &'a str, object: &'a str) -> Scope<'a> {
        Scope {
            family,
            table,
            object: Some(object),
        }
    }

    fn holds(&self, msg: &[u8], table_attr: u16, object_attr: u16) -> bool {
        let is = |ty: u16, want: &str| {
            find_attr(msg, ty).is_some_and(|p| {
                let end = p.iter().position(|&b| b == 0).unwrap_or(p.len());
                &p[..end] == want.as_bytes()
            })
        };
        is(table_attr, self.table) && self.object.is_none_or(|o| is(object_attr, o))
    }
}

/// The attributes naming an object's table and, for rules and elements, its
/// chain or set (for chains and sets: their own name).
fn scope_attrs(msg_type: u32) -> (u16, u16) {
    match msg_type {
        sys::NFT_MSG_GETCHAIN => (sys::NFTA_CHAIN_TABLE, sys::NFTA_CHAIN_NAME),
        sys::NFT_MSG_GETRULE => (sys::NFTA_RULE_TABLE, sys::NFTA_RULE_CHAIN),
        sys::NFT_MSG_GETSET => (sys::NFTA_SET_TABLE, sys::NFTA_SET_NAME),
        _ => (sys::NFTA_SET_ELEM_LIST_TABLE, sys::NFTA_SET_ELEM_LIST_SET),
    }
}

enum RequestError {
    Netlink(NetlinkError),
    Errno(Errno),
    Interrupted,
}

#[cfg(test)]
mod tests;
