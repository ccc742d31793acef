//! One nf_tables batch: messages, their descriptions, and the BEGIN/END
//! frame carrying the generation id.

use std::fmt;

use rustables::{Batch, MsgType, ProtocolFamily};

use super::attrs::{align4, parse_msg};
use super::Attrs;

/// One nf_tables message (NFT_MSG_*), ready for a rustables `Batch`.
#[derive(Clone)]
pub struct NftMsg {
    pub msg_type: u16,
    pub family: ProtocolFamily,
    pub flags: u16,
    pub attrs: Vec<u8>,
}

impl fmt::Debug for NftMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NftMsg(type {}, {} bytes)",
            self.msg_type,
            self.attrs.len()
        )
    }
}

impl NftMsg {
    pub fn new(msg_type: u32, flags: u32, attrs: Attrs) -> NftMsg {
        NftMsg {
            msg_type: msg_type as u16,
            family: ProtocolFamily::Ipv4,
            flags: flags as u16,
            attrs: attrs.into_bytes(),
        }
    }

    /// The message for a table of `family` (IPv4 unless said).
    pub fn in_family(mut self, family: crate::model::Family) -> NftMsg {
        self.family = protocol_family(family);
        self
    }
}

/// rustables' name of the tables of `family` (`ip` or `ip6`).
pub fn protocol_family(family: crate::model::Family) -> ProtocolFamily {
    match family {
        crate::model::Family::Ipv4 => ProtocolFamily::Ipv4,
        crate::model::Family::Ipv6 => ProtocolFamily::Ipv6,
    }
}

pub(super) fn nlmsg_header(
    buf: &mut Vec<u8>,
    msg_type: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
}

pub(super) fn patch_len(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// A batch under construction, with a description of every message so a
/// refusal can name the object the kernel refused.
pub struct NftBatch {
    body: Vec<u8>,
    what: Vec<String>,
}

impl Default for NftBatch {
    fn default() -> Self {
        NftBatch::new()
    }
}

/// The batch begin message with its generation attribute: header (16),
/// nfgenmsg (4), NFNL_BATCH_GENID (8). It heads the body from the start, so
/// finalizing appends the end message and copies nothing.
const BEGIN_LEN: usize = 28;

impl NftBatch {
    pub fn new() -> NftBatch {
        NftBatch::reusing(BatchBuffers {
            body: Vec::with_capacity(4096),
            what: Vec::new(),
        })
    }

    /// A new batch in the buffers of one sent before (a change batch then
    /// allocates nothing, and writes to memory that is in the cache).
    pub fn reusing(buffers: BatchBuffers) -> NftBatch {
        let BatchBuffers { mut body, mut what } = buffers;
        body.clear();
        what.clear();
        nlmsg_header(
            &mut body,
            libc::NFNL_MSG_BATCH_BEGIN as u16,
            0,
            0,
            libc::AF_UNSPEC as u8,
            libc::NFNL_SUBSYS_NFTABLES as u16,
        );
        // NFNL_BATCH_GENID, its value set by `finalize`.
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&(libc::NFNL_BATCH_GENID as u16).to_ne_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        patch_len(&mut body, 0);
        debug_assert_eq!(body.len(), BEGIN_LEN);
        // seq 0 is the begin message.
        what.push("the batch (generation check)".to_string());
        NftBatch { body, what }
    }

    fn seq(&self) -> u32 {
        self.what.len() as u32
    }

    /// Adds a message without a description: building the text of every
    /// message of a big batch costs more than encoding it, so a flavor may
    /// leave it to [`NetlinkError::Undescribed`] and describe the one the
    /// kernel refuses, if it does.
    ///
    /// [`NetlinkError::Undescribed`]: super::NetlinkError::Undescribed
    pub fn add_undescribed(&mut self, msg: NftMsg) {
        self.add(msg, String::new());
    }

    /// Adds a message without a description whose attributes `f` writes
    /// straight into the batch (no buffer of its own, nothing copied).
    pub fn add_with(
        &mut self,
        msg_type: u32,
        flags: u32,
        family: crate::model::Family,
        f: impl FnOnce(&mut Attrs),
    ) {
        let seq = self.seq();
        let start = self.body.len();
        let ty = ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | msg_type as u16;
        let family = protocol_family(family) as u8;
        nlmsg_header(&mut self.body, ty, flags as u16, seq, family, 0);
        let mut attrs = Attrs::from_bytes(std::mem::take(&mut self.body));
        f(&mut attrs);
        self.body = attrs.into_bytes();
        patch_len(&mut self.body, start);
        self.what.push(String::new());
    }

    pub fn add(&mut self, msg: NftMsg, what: impl Into<String>) {
        let seq = self.seq();
        let start = self.body.len();
        let ty = ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | msg.msg_type;
        nlmsg_header(&mut self.body, ty, msg.flags, seq, msg.family as u8, 0);
        self.body.extend_from_slice(&msg.attrs);
        patch_len(&mut self.body, start);
        self.what.push(what.into());
    }

    /// Splices the object messages of a finalized rustables batch (between
    /// its begin and end) into this batch, renumbering them.
    fn splice(&mut self, raw: Vec<u8>, what: String) {
        let mut off = 0;
        let mut msgs = Vec::new();
        while let Some(m) = parse_msg(&raw[off..]) {
            msgs.push((off, m.total_len, m.msg_type));
            off += align4(m.total_len);
        }
        for (off, len, ty) in msgs {
            if ty == libc::NFNL_MSG_BATCH_BEGIN as u16 || ty == libc::NFNL_MSG_BATCH_END as u16 {
                continue;
            }
            let start = self.body.len();
            self.body.extend_from_slice(&raw[off..off + len]);
            let seq = self.seq();
            self.body[start + 8..start + 12].copy_from_slice(&seq.to_ne_bytes());
            self.body.resize(start + align4(len), 0);
            self.what.push(what.clone());
        }
    }

    pub fn add_table(&mut self, table: &rustables::Table, op: MsgType, what: impl Into<String>) {
        let mut b = Batch::new();
        b.add(table, op);
        self.splice(b.finalize(), what.into());
    }

    pub fn add_chain(&mut self, chain: &rustables::Chain, op: MsgType, what: impl Into<String>) {
        let mut b = Batch::new();
        b.add(chain, op);
        self.splice(b.finalize(), what.into());
    }

    /// Number of object messages (without begin/end).
    pub fn len(&self) -> usize {
        self.what.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the messages so far, in bytes.
    pub fn byte_len(&self) -> usize {
        self.body.len() - BEGIN_LEN
    }

    /// The wire bytes: begin (with `genid` when given), messages, end.
    pub fn finalize(self, genid: Option<u32>) -> FinalBatch {
        let mut bytes = self.body;
        match genid {
            // The attribute's value: the last four bytes of the begin message.
            Some(g) => bytes[BEGIN_LEN - 4..BEGIN_LEN].copy_from_slice(&g.to_be_bytes()),
            None => {
                bytes.drain(BEGIN_LEN - 8..BEGIN_LEN);
                let begin = (BEGIN_LEN - 8) as u32;
                bytes[..4].copy_from_slice(&begin.to_ne_bytes());
            }
        }
        let end = bytes.len();
        nlmsg_header(
            &mut bytes,
            libc::NFNL_MSG_BATCH_END as u16,
            0,
            self.what.len() as u32,
            libc::AF_UNSPEC as u8,
            libc::NFNL_SUBSYS_NFTABLES as u16,
        );
        patch_len(&mut bytes, end);
        FinalBatch {
            bytes,
            what: self.what,
            genid,
        }
    }
}

/// Bytes ready to send, with the description of each sequence number.
pub struct FinalBatch {
    pub bytes: Vec<u8>,
    pub what: Vec<String>,
    pub genid: Option<u32>,
}

impl FinalBatch {
    /// The buffers, for the next batch (`NftBatch::reusing`).
    pub fn into_buffers(self) -> BatchBuffers {
        BatchBuffers {
            body: self.bytes,
            what: self.what,
        }
    }
}

/// A sent batch's buffers. One far bigger than a change batch needs (after
/// a full table) is not kept: `keep` drops it.
pub struct BatchBuffers {
    body: Vec<u8>,
    what: Vec<String>,
}

impl BatchBuffers {
    /// Biggest body kept for reuse: a few hundred element messages.
    const KEEP: usize = 64 << 10;

    pub fn keep(self) -> Option<BatchBuffers> {
        (self.body.capacity() <= Self::KEEP && self.what.capacity() <= Self::KEEP / 64)
            .then_some(self)
    }
}
