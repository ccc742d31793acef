//! Real traffic through the NAT of a `Sandbox`, the same checks for every
//! flavor: mappings public:25/tcp → pod A:2525 and public:5353/udp → pod
//! A:5300 must be programmed, with SNAT of pod A to the public address.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use super::netns::{
    Netns, Sandbox, CLIENT_IP, CLIENT_IP6, POD_A_IP, POD_A_IP6, POD_B_IP, POD_B_IP6, PUBLIC_IP,
    PUBLIC_IP6,
};

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

/// A listener on `at`; a bind refused with EADDRINUSE (seen once, in
/// `make test`, right after the other family's check closed its listener on
/// the same port) is tried again for up to 2 s.
fn listen(at: SocketAddr) -> TcpListener {
    let start = std::time::Instant::now();
    loop {
        match TcpListener::bind(at) {
            Ok(l) => return l,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && start.elapsed() < Duration::from_secs(2) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("bind {at}: {e}"),
        }
    }
}

fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&to, Duration::from_secs(3))
}

/// The sandbox's addresses of one family.
pub struct Addrs {
    pub public: &'static str,
    pub client: &'static str,
    pub pod_a: &'static str,
    pub pod_b: &'static str,
}

pub const V4: Addrs = Addrs {
    public: PUBLIC_IP,
    client: CLIENT_IP,
    pod_a: POD_A_IP,
    pod_b: POD_B_IP,
};

/// IPv6, with `Sandbox::with_ipv6`.
pub const V6: Addrs = Addrs {
    public: PUBLIC_IP6,
    client: CLIENT_IP6,
    pod_a: POD_A_IP6,
    pod_b: POD_B_IP6,
};

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

/// The unspecified address of `ip`'s family, port `port`: where a pod
/// listens.
fn any(ip: &str, port: u16) -> SocketAddr {
    let unspecified: IpAddr = if ip.contains(':') {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(unspecified, port)
}

/// TCP and UDP in through the public address, the UDP reply from it, the
/// pod's own connection out through it, and 10.x traffic un-NATed.
pub fn check_mail_traffic(sb: &Sandbox) {
    check_mail_traffic_of(sb, &V4);
}

/// `check_mail_traffic` over the family of `a`: for IPv6, internal means
/// fc00::/7.
pub fn check_mail_traffic_of(sb: &Sandbox, a: &Addrs) {
    // TCP: client → public:25 reaches the pod's listener on 2525.
    let listener = sb.pod_a.run(|| listen(any(a.public, 2525)));
    let mut client = sb
        .client
        .run(|| connect(at(a.public, 25)).expect("TCP through the DNAT"));
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        a.client,
        "DNAT keeps the client's address"
    );
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // UDP: client → public:5353 reaches the pod on 5300, and the reply comes
    // back from the public address.
    let pod_udp = sb
        .pod_a
        .run(|| UdpSocket::bind(any(a.public, 5300)).unwrap());
    pod_udp
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let client_udp = sb.client.run(|| UdpSocket::bind(any(a.public, 0)).unwrap());
    client_udp
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    client_udp.send_to(b"hello", at(a.public, 5353)).unwrap();
    let (n, from) = pod_udp
        .recv_from(&mut buf[..])
        .expect("UDP through the DNAT");
    assert_eq!(n, 4);
    assert_eq!(from.ip().to_string(), a.client);
    pod_udp.send_to(b"pong", from).unwrap();
    let (_, reply_from) = client_udp.recv_from(&mut buf).expect("UDP reply");
    assert_eq!(reply_from, at(a.public, 5353));

    // SNAT: the pod's own connection to the client shows the public address.
    let client_listener = sb
        .client
        .run(|| TcpListener::bind(at(a.client, 8080)).unwrap());
    let _out = sb
        .pod_a
        .run(|| connect(at(a.client, 8080)).expect("pod → client through the SNAT"));
    let (_c, seen) = client_listener.accept().unwrap();
    assert_eq!(
        seen.ip().to_string(),
        a.public,
        "outbound traffic leaves through the public address"
    );

    // Internal destinations keep the pod address.
    let pod_b_listener = sb
        .pod_b
        .run(|| TcpListener::bind(at(a.pod_b, 9000)).unwrap());
    let _in = sb
        .pod_a
        .run(|| connect(at(a.pod_b, 9000)).expect("pod A → pod B"));
    let (_c, seen) = pod_b_listener.accept().unwrap();
    assert_eq!(
        seen.ip().to_string(),
        a.pod_a,
        "internal destinations are not SNATed"
    );
}
