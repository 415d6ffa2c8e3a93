//! TLS 1.3 (QUIC allows nothing else) for workers and clients. A worker makes a self-signed
//! certificate on first start and keeps it; clients either pin its SHA-256 fingerprint
//! (`quic://host:port#sha256=...`) or check it against CA roots they are given.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{io_err, Error, Result};
use crate::protocol::ALPN;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A worker's certificate and key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    /// The certificate kept in `dir` (`cert.der`, `key.der`), made first when there is none;
    /// the flag says whether it was made now.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<(Self, bool)> {
        let (cert_path, key_path) = (dir.join("cert.der"), dir.join("key.der"));
        if cert_path.is_file() && key_path.is_file() {
            let cert = std::fs::read(&cert_path).map_err(io_err(cert_path.display()))?;
            let key = std::fs::read(&key_path).map_err(io_err(key_path.display()))?;
            return Ok((
                Self {
                    cert: cert.into(),
                    key: key.into(),
                },
                false,
            ));
        }
        let made = Self::generate(names)?;
        std::fs::create_dir_all(dir).map_err(io_err(dir.display()))?;
        write_private(&key_path, made.key.secret_pkcs8_der())?;
        std::fs::write(&cert_path, &made.cert).map_err(io_err(cert_path.display()))?;
        Ok((made, true))
    }

    /// A fresh self-signed certificate (ECDSA P-256) for these host names.
    pub fn generate(names: &[String]) -> Result<Self> {
        let made = rcgen::generate_simple_self_signed(names.to_vec()).map_err(tls_err)?;
        Ok(Self {
            cert: made.cert.der().clone(),
            key: made.signing_key.serialize_der().into(),
        })
    }

    /// A fresh self-signed certificate that browsers accept by hash (`serverCertificateHashes`):
    /// ECDSA P-256, valid for less than two weeks, starting an hour ago so that a client whose
    /// clock is a little behind still takes it.
    pub fn short_lived(names: &[String]) -> Result<Self> {
        let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(tls_err)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(13);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(tls_err)?;
        let cert = params.self_signed(&key).map_err(tls_err)?;
        Ok(Self {
            cert: cert.der().clone(),
            key: key.serialize_der().into(),
        })
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert)
    }
}

/// Writes a secret readable by its owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(io_err(path.display()))?;
    f.write_all(bytes).map_err(io_err(path.display()))
}

/// QUIC settings both ends share: keep-alives so a dead or frozen peer is noticed within
/// `idle_timeout`, and flow-control windows large enough for whole latents in flight.
#[derive(Clone, Copy, Debug)]
pub struct LinkOptions {
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Requests one client may have open on a worker at once.
    pub max_streams: u32,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(15),
            keep_alive: Duration::from_secs(2),
            max_streams: 8,
        }
    }
}

fn transport(link: &LinkOptions) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Probe for datagrams up to loopback's and jumbo-frame networks' size: latents are megabytes,
    // and per-packet work, not bandwidth, bounds QUIC's throughput on fast links.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(65_000);
    t.mtu_discovery_config(Some(mtu));
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(link.idle_timeout).map_err(tls_err)?))
        .keep_alive_interval(Some(link.keep_alive))
        .max_concurrent_bidi_streams(link.max_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((64u32 << 20).into())
        .receive_window((256u32 << 20).into())
        .send_window(256 << 20);
    Ok(t)
}

fn server_tls(identity: &Identity, alpn: &[u8]) -> Result<rustls::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], PrivateKeyDer::Pkcs8(identity.key.clone_key()))
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

pub fn server_config(identity: &Identity, link: &LinkOptions) -> Result<quinn::ServerConfig> {
    let tls = server_tls(identity, ALPN)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).map_err(tls_err)?));
    config.transport_config(Arc::new(transport(link)?));
    Ok(config)
}

/// The WebTransport (HTTP/3) endpoint's settings: the QUIC endpoint's transport, plus the
/// unidirectional streams HTTP/3 itself uses.
pub fn webtransport_config(listen: std::net::SocketAddr, identity: &Identity, link: &LinkOptions) -> Result<wtransport::ServerConfig> {
    let tls = server_tls(identity, wtransport::tls::WEBTRANSPORT_ALPN)?;
    let mut transport = transport(link)?;
    // HTTP/3 needs unidirectional streams for its control and QPACK streams.
    transport.max_concurrent_uni_streams(16u32.into());
    Ok(wtransport::ServerConfig::builder()
        .with_bind_address(listen)
        .with_custom_tls_and_transport(tls, transport)
        .build())
}

/// How a client decides to trust a worker.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Exactly the certificate with this SHA-256 fingerprint.
    Pinned([u8; 32]),
    /// Certificates that chain to these roots and name the host (PEM or DER files).
    Roots(Vec<CertificateDer<'static>>),
}

impl Trust {
    /// CA certificates from a PEM file (or one DER certificate).
    pub fn roots_from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_err(path.display()))?;
        let pem: Vec<_> = CertificateDer::pem_slice_iter(&bytes).collect::<Result<_, _>>().unwrap_or_default();
        let certs = if pem.is_empty() { vec![CertificateDer::from(bytes)] } else { pem };
        Ok(Trust::Roots(certs))
    }
}

pub fn client_config(trust: &Trust, link: &LinkOptions) -> Result<quinn::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?;
    let mut tls = match trust {
        Trust::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                pin: *pin,
                algorithms: provider().signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        Trust::Roots(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots.add(c.clone()).map_err(tls_err)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).map_err(tls_err)?));
    config.transport_config(Arc::new(transport(link)?));
    Ok(config)
}

/// Accepts exactly one certificate, by fingerprint; the handshake signature is still checked,
/// so only the holder of that certificate's key gets through.
#[derive(Debug)]
struct PinnedCert {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the worker's certificate has sha256={}, not the pinned sha256={}",
                hex(&got),
                hex(&self.pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The worker's bearer token kept in `dir/token`, made (32 random bytes, hex) when there is
/// none; the flag says whether it was made now.
pub fn load_or_create_token(dir: &Path) -> Result<(String, bool)> {
    let path = dir.join("token");
    if path.is_file() {
        let token = std::fs::read_to_string(&path).map_err(io_err(path.display()))?;
        return Ok((token.trim().to_string(), false));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir.display()))?;
    let token = hex(&rand::random::<[u8; 32]>());
    write_private(&path, token.as_bytes())?;
    Ok((token, true))
}
