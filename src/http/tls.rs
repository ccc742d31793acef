//! The server's TLS configuration (rustls with ring, the provider kube
//! already brings): the certificate and key from PEM files the chart mounts
//! from a Secret, else a self-signed certificate made at start (rcgen) for
//! the node's name and addresses.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use super::HttpError;
use crate::config::TlsSource;

/// The TLS configuration for `source`; `names` (DNS names and IP addresses)
/// go into a self-signed certificate's subject alternative names.
pub fn server_config(source: &TlsSource, names: &[String]) -> Result<Arc<ServerConfig>, HttpError> {
    let (chain, key) = match source {
        TlsSource::Files { cert, key } => (read_chain(cert)?, read_key(key)?),
        TlsSource::SelfSigned => self_signed(names)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(HttpError::Tls)?;
    // Only HTTP/1.1 is served: say so, so that an h2-first client does not
    // try HTTP/2 on this connection.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, HttpError> {
    let err = |source| HttpError::TlsFile {
        path: path.to_path_buf(),
        source,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(err)?;
    if chain.is_empty() {
        return Err(err(rustls::pki_types::pem::Error::NoItemsFound));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, HttpError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| HttpError::TlsFile {
        path: path.to_path_buf(),
        source,
    })
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn self_signed(names: &[String]) -> Result<Identity, HttpError> {
    // rcgen makes an IP address SAN of every name that parses as one.
    let certified =
        rcgen::generate_simple_self_signed(names.to_vec()).map_err(HttpError::SelfSigned)?;
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    Ok((vec![certified.cert.der().clone()], key.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_names_the_node() {
        let names = ["node1".to_string(), "203.0.113.7".to_string()];
        let (chain, _) = self_signed(&names).expect("self-signed");
        let der = chain[0].as_ref();
        // The DNS name in clear, the address as its four bytes.
        assert!(der.windows(5).any(|w| w == b"node1"));
        assert!(der.windows(4).any(|w| w == [203, 0, 113, 7]));
        assert!(server_config(&TlsSource::SelfSigned, &names).is_ok());
    }

    #[test]
    fn missing_files_are_named() {
        let source = TlsSource::Files {
            cert: "/nonexistent/tls.crt".into(),
            key: "/nonexistent/tls.key".into(),
        };
        let e = server_config(&source, &[]).expect_err("no such file");
        assert!(e.to_string().contains("/nonexistent/tls.crt"), "{e}");
    }
}
