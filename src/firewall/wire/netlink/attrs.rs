//! Netlink attributes (TLVs): building them, and reading them and whole
//! messages out of the kernel's answers.

use super::{NFGENMSG_LEN, NLA_F_NESTED, NLA_TYPE_MASK, NLMSG_HDRLEN};

/// Builds netlink attributes (TLVs) into a byte buffer.
#[derive(Default, Clone)]
pub struct Attrs {
    buf: Vec<u8>,
}

pub(super) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Attrs {
    pub fn new() -> Attrs {
        Attrs::default()
    }

    /// Writes the header of the attribute that starts at `start` and ends
    /// at the end of the buffer, then pads the buffer to 4 bytes.
    fn close(&mut self, start: usize, ty: u16) {
        let len = u16::try_from(self.buf.len() - start)
            .expect("a netlink attribute is at most 65535 bytes");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&ty.to_ne_bytes());
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub fn bytes(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(data);
        self.close(start, ty);
        self
    }

    /// A NUL-terminated string, as nf_tables expects names.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.close(start, ty);
        self
    }

    pub fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    pub fn be64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    /// A nested attribute whose content `f` writes, in place: no buffer of
    /// its own per level (a rule nests four deep, per expression).
    pub fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        f(self);
        self.close(start, ty | NLA_F_NESTED);
        self
    }

    /// A nested attribute holding the attributes of `inner`.
    pub fn nest_attrs(&mut self, ty: u16, inner: &Attrs) -> &mut Self {
        self.bytes(ty | NLA_F_NESTED, &inner.buf)
    }

    /// Attributes appended to `buf` (which keeps what it holds).
    pub fn from_bytes(buf: Vec<u8>) -> Attrs {
        Attrs { buf }
    }

    pub fn with_capacity(bytes: usize) -> Attrs {
        Attrs {
            buf: Vec::with_capacity(bytes),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Appends the attributes of `other` (already aligned).
    pub fn extend_from(&mut self, other: &Attrs) {
        self.buf.extend_from_slice(&other.buf);
    }
}

/// Iterates over the attributes in `buf`: (type without flags, payload).
pub fn parse_attrs(buf: &[u8]) -> AttrIter<'_> {
    AttrIter { buf }
}

pub struct AttrIter<'a> {
    buf: &'a [u8],
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.buf[0], self.buf[1]]) as usize;
        let ty = u16::from_ne_bytes([self.buf[2], self.buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.buf.len() {
            self.buf = &[];
            return None;
        }
        let payload = &self.buf[4..len];
        self.buf = &self.buf[align4(len).min(self.buf.len())..];
        Some((ty, payload))
    }
}

/// The first attribute of type `ty` in `buf`.
pub fn find_attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    parse_attrs(buf).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

pub fn attr_str(buf: &[u8], ty: u16) -> Option<String> {
    find_attr(buf, ty).map(|p| {
        let end = p.iter().position(|&b| b == 0).unwrap_or(p.len());
        String::from_utf8_lossy(&p[..end]).into_owned()
    })
}

/// Whether string attribute `ty` is `s` (compared in place: no allocation,
/// for the per-element and per-rule paths of a scrape).
pub fn attr_str_is(buf: &[u8], ty: u16, s: &str) -> bool {
    find_attr(buf, ty).is_some_and(|p| {
        let end = p.iter().position(|&b| b == 0).unwrap_or(p.len());
        &p[..end] == s.as_bytes()
    })
}

pub fn attr_be32(buf: &[u8], ty: u16) -> Option<u32> {
    find_attr(buf, ty)
        .and_then(|p| p.get(..4))
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub fn attr_be64(buf: &[u8], ty: u16) -> Option<u64> {
    find_attr(buf, ty)
        .and_then(|p| p.get(..8))
        .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
}

/// A parsed nfnetlink message.
pub struct RawMsg<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub family: u8,
    pub total_len: usize,
    pub attrs: &'a [u8],
}

pub(super) fn parse_msg(buf: &[u8]) -> Option<RawMsg<'_>> {
    if buf.len() < NLMSG_HDRLEN {
        return None;
    }
    let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
    if len < NLMSG_HDRLEN || len > buf.len() {
        return None;
    }
    let msg_type = u16::from_ne_bytes([buf[4], buf[5]]);
    let flags = u16::from_ne_bytes([buf[6], buf[7]]);
    let seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
    let (family, attrs) = if len >= NLMSG_HDRLEN + NFGENMSG_LEN {
        (buf[NLMSG_HDRLEN], &buf[NLMSG_HDRLEN + NFGENMSG_LEN..len])
    } else {
        (0, &buf[NLMSG_HDRLEN..len])
    };
    Some(RawMsg {
        msg_type,
        flags,
        seq,
        family,
        total_len: len,
        attrs,
    })
}

/// Every netlink message in a datagram, in order.
pub fn parse_all(buf: &[u8]) -> impl Iterator<Item = RawMsg<'_>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let m = parse_msg(buf.get(off..)?)?;
        off += align4(m.total_len);
        Some(m)
    })
}
