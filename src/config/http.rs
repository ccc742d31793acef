//! The flags of the HTTP side: who may read (`-httpauth`), where it listens
//! (`-httpaddress`) and the TLS certificate (`--tls-cert-file`,
//! `--tls-private-key-file`, spelled as the kubelet's). Kept beside
//! `config.rs` so the flag table there stays one screen per concern.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::Args;

use super::parse_bool;

#[derive(Debug, Clone, Args)]
pub struct HttpFlags {
    /// Remote clients read /metrics and /entries/list only over TLS with a bearer token the apiserver authenticates and authorizes; false: open HTTP for a port you firewall yourself [SPEC: -httpauth]
    #[arg(long = "http-auth", global = true, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true", value_parser = parse_bool)]
    pub http_auth: bool,
    /// Address the HTTP port is bound to: 0.0.0.0 (all IPv4, as the Go version), :: (all, both families) or one address [SPEC: -httpaddress]
    #[arg(long = "http-address", global = true, value_name = "IP", default_value = "0.0.0.0", value_parser = parse_bind_address)]
    pub http_address: IpAddr,
    /// PEM certificate (chain) served over TLS; default: a self-signed one made at start [kubelet: --tls-cert-file]
    #[arg(long = "tls-cert-file", global = true, value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file [kubelet: --tls-private-key-file]
    #[arg(long = "tls-private-key-file", global = true, value_name = "FILE")]
    pub tls_private_key_file: Option<PathBuf>,
}

/// Go-style (lowercase) names of these flags → the canonical long name.
pub(super) const ALIASES: &[(&str, &str)] = &[
    ("httpauth", "http-auth"),
    ("httpaddress", "http-address"),
    ("tlscertfile", "tls-cert-file"),
    ("tlsprivatekeyfile", "tls-private-key-file"),
];

/// Where the certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// `--tls-cert-file` and `--tls-private-key-file`.
    Files { cert: PathBuf, key: PathBuf },
    /// Made at start, self-signed.
    SelfSigned,
}

/// The validated HTTP settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub auth: bool,
    pub address: IpAddr,
    pub tls: TlsSource,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            auth: true,
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            tls: TlsSource::SelfSigned,
        }
    }
}

impl HttpFlags {
    /// The settings, or the one-line reason they do not fit together.
    pub(super) fn validate(self) -> Result<HttpConfig, String> {
        let tls = match (self.tls_cert_file, self.tls_private_key_file) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => TlsSource::SelfSigned,
            (Some(_), None) => {
                return Err("'--tls-cert-file' needs '--tls-private-key-file' too".into())
            }
            (None, Some(_)) => {
                return Err("'--tls-private-key-file' needs '--tls-cert-file' too".into())
            }
        };
        // Silently serving plain HTTP while the operator mounted a
        // certificate would look protected and is not.
        if !self.http_auth && tls != TlsSource::SelfSigned {
            return Err(
                "'--tls-cert-file' is used only with '--http-auth=true' (-httpauth=false serves plain HTTP)"
                    .into(),
            );
        }
        Ok(HttpConfig {
            auth: self.http_auth,
            address: self.http_address,
            tls,
        })
    }
}

fn parse_bind_address(s: &str) -> Result<IpAddr, String> {
    // `[::]` as some users write it for URLs.
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse().map_err(|_| {
        "expected an IP address to bind: 0.0.0.0 (all IPv4), :: (all) or one of the node's addresses"
            .into()
    })
}
