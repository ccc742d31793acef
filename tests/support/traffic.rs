//! Real traffic through the NAT of a `Sandbox`, the same checks for every
//! flavor: mappings public:25/tcp → pod A:2525 and public:5353/udp → pod
//! A:5300 must be programmed, with SNAT of pod A to the public address.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use super::netns::{Netns, Sandbox, CLIENT_IP, POD_A_IP, POD_B_IP, PUBLIC_IP};

/// Connects from `ns` to `addr`, sends a byte and expects an echo server
/// to return it.
pub fn echo_roundtrip(ns: &Netns, addr: SocketAddr) -> bool {
    ns.run(|| {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut b = [0u8; 1];
        s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && b == *b"x"
    })
}

fn connect(to: &str) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&to.parse().unwrap(), Duration::from_secs(3))
}

/// TCP and UDP in through the public address, the UDP reply from it, the
/// pod's own connection out through it, and 10.x traffic un-NATed.
pub fn check_mail_traffic(sb: &Sandbox) {
    // TCP: client → public:25 reaches the pod's listener on 2525.
    let listener = sb.pod_a.run(|| TcpListener::bind("0.0.0.0:2525").unwrap());
    let mut client = sb
        .client
        .run(|| connect(&format!("{PUBLIC_IP}:25")).expect("TCP through the DNAT"));
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        CLIENT_IP,
        "DNAT keeps the client's address"
    );
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // UDP: client → public:5353 reaches the pod on 5300, and the reply comes
    // back from the public address.
    let pod_udp = sb.pod_a.run(|| UdpSocket::bind("0.0.0.0:5300").unwrap());
    pod_udp
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let client_udp = sb.client.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    client_udp
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    client_udp
        .send_to(b"hello", format!("{PUBLIC_IP}:5353"))
        .unwrap();
    let (n, from) = pod_udp
        .recv_from(&mut buf[..])
        .expect("UDP through the DNAT");
    assert_eq!(n, 4);
    assert_eq!(from.ip().to_string(), CLIENT_IP);
    pod_udp.send_to(b"pong", from).unwrap();
    let (_, reply_from) = client_udp.recv_from(&mut buf).expect("UDP reply");
    assert_eq!(
        reply_from,
        format!("{PUBLIC_IP}:5353").parse::<SocketAddr>().unwrap()
    );

    // SNAT: the pod's own connection to the client shows the public address.
    let client_listener = sb
        .client
        .run(|| TcpListener::bind(format!("{CLIENT_IP}:8080")).unwrap());
    let _out = sb
        .pod_a
        .run(|| connect(&format!("{CLIENT_IP}:8080")).expect("pod → client through the SNAT"));
    let (_c, seen) = client_listener.accept().unwrap();
    assert_eq!(
        seen.ip().to_string(),
        PUBLIC_IP,
        "outbound traffic leaves through the public address"
    );

    // Internal destinations keep the pod address.
    let pod_b_listener = sb
        .pod_b
        .run(|| TcpListener::bind(format!("{POD_B_IP}:9000")).unwrap());
    let _in = sb
        .pod_a
        .run(|| connect(&format!("{POD_B_IP}:9000")).expect("pod A → pod B"));
    let (_c, seen) = pod_b_listener.accept().unwrap();
    assert_eq!(
        seen.ip().to_string(),
        POD_A_IP,
        "10.x destinations are not SNATed"
    );
}
