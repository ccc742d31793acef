//! One netlink dump read to its end, for the protocols the agent reads with
//! the rust-netlink message crates (ctnetlink for conntrack, sock_diag for
//! the node's sockets): every inner message handed on, the kernel's error
//! returned as its errno.

use netlink_packet_core::{NetlinkDeserializable, NetlinkMessage, NetlinkPayload};
use netlink_sys::Socket;

/// Why a dump could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot decode a netlink message: {0}")]
    Decode(String),
    #[error("the kernel refused the request (errno {0})")]
    Refused(i32),
}

/// Receives the answer to the dump request just sent on `sock` until its
/// `Done`, handing each inner message to `each`. `buf` is the receive buffer
/// (one datagram at a time).
pub(crate) fn read_dump<M: NetlinkDeserializable>(
    sock: &Socket,
    buf: &mut [u8],
    mut each: impl FnMut(M),
) -> Result<(), DumpError> {
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<M>::deserialize(&buf[off..n])
                .map_err(|e| DumpError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(DumpError::Refused(e.code.map_or(0, |c| c.get())));
                }
                NetlinkPayload::InnerMessage(m) => each(m),
                _ => {}
            }
        }
    }
}
