//! The replication link's security: mutual TLS 1.3 (rustls), or `--insecure`.
//!
//! A pair shares one certificate authority. Each node presents a certificate issued by it
//! for the pair's name (a DNS subject alternative name equal to `--name`), and accepts a
//! peer only if the peer's certificate chains to that CA *and* is issued for the same pair
//! name: a certificate of another pair, even one signed by the same CA, cannot feed this
//! backup. Both directions are checked during the handshake (the client checks the
//! server's name as HTTPS does; the server checks the client's with the same rule), so a
//! peer that fails is refused before a byte of guest state is read or sent, and both sides
//! get the cause. `lockstep certs` makes a CA and node certificates for small setups.
//!
//! Only TLS 1.3 is offered, without session tickets or resumption: each connection is a
//! full handshake with fresh keys, so a recorded stream cannot be replayed into another
//! connection, and within one connection the record layer's sequence numbers refuse a
//! replayed, reordered or altered record (RFC 8446, section 5.3).
//!
//! This module loads the configuration and runs handshakes on a blocking socket; the
//! record layer of an established connection lives in [`crate::transport`], shared by its
//! two halves.

use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerifier};
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, ServerConnection, SignatureScheme,
};
use thiserror::Error;

use crate::protocol::{Message, MAGIC};
use crate::transport::{Connection, TransportError};

/// Longest a TLS handshake may take before the peer counts as not answering.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors loading the link's keys and certificates: each names the file and the problem.
#[derive(Debug, Error)]
pub enum TlsConfigError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{what} {path}: {problem}")]
    File {
        /// Which option ("--tls-cert", ...).
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The pair's name cannot be a certificate's DNS name.
    #[error(
        "the pair name '{0}' cannot name a TLS certificate (use letters, digits, '-' and '.')"
    )]
    Name(String),
    /// rustls refused the combination (a key that does not match its certificate, ...).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A node's TLS identity: its certificate chain and key, the pair's CA, and the pair's name
/// that both ends' certificates must carry.
pub struct TlsIdentity {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: ServerName<'static>,
    /// This node's chain, the pair's CA and the certificate's file, for [`Self::check_own`].
    own: (Vec<CertificateDer<'static>>, Arc<RootCertStore>, PathBuf),
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn read_pem_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|e| TlsConfigError::File {
        what,
        path: path.to_path_buf(),
        problem: e.to_string(),
    })
}

/// Where a PEM item came from, for errors: the option and its file.
type Source<'a> = (&'static str, &'a Path);

fn file_error(from: Source<'_>, problem: String) -> TlsConfigError {
    TlsConfigError::File {
        what: from.0,
        path: from.1.to_path_buf(),
        problem,
    }
}

fn certificates(
    pem: &[u8],
    from: Source<'_>,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(from, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            from,
            "holds no certificate (expected PEM 'BEGIN CERTIFICATE')".into(),
        ));
    }
    Ok(certs)
}

impl TlsIdentity {
    /// Loads `cert` (PEM: this node's certificate, then any intermediates), `key` (PEM
    /// private key: PKCS#8, PKCS#1 or SEC1) and `ca` (PEM: the pair's CA certificates), for
    /// the pair called `name`.
    ///
    /// # Errors
    ///
    /// A missing or unreadable file, a file without the expected PEM item, a key that does
    /// not match the certificate, or a `name` that is no DNS name.
    pub fn load(cert: &Path, key: &Path, ca: &Path, name: &str) -> Result<Self, TlsConfigError> {
        let files = [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)];
        let [c, k, a] = files.map(|(what, path)| read_pem_file(what, path));
        Self::from_pem([(&c?, files[0]), (&k?, files[1]), (&a?, files[2])], name)
    }

    /// [`TlsIdentity::load`] from PEM bytes: `[cert, key, ca]`, each with the option and
    /// file it came from (for errors).
    pub fn from_pem(pems: [(&[u8], Source<'_>); 3], name: &str) -> Result<Self, TlsConfigError> {
        let [(cert, cert_from), (key, key_from), (ca, ca_from)] = pems;
        let name = pair_name(name)?;
        let chain = certificates(cert, cert_from)?;
        if String::from_utf8_lossy(key).contains("ENCRYPTED PRIVATE KEY") {
            return Err(file_error(
                key_from,
                "is encrypted: lockstep reads unencrypted keys only (keep the file readable \
                 by root alone)"
                    .into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| file_error(key_from, format!("holds no usable private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for c in certificates(ca, ca_from)? {
            roots
                .add(c)
                .map_err(|e| file_error(ca_from, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(link_provider());
        let config_err = |e: rustls::Error| TlsConfigError::Config(e.to_string());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsConfigError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(Arc::new(PairClientVerifier {
                inner: verifier,
                name: name.clone(),
            }))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => file_error(
                    key_from,
                    "does not go with the certificate of --tls-cert (it is another key)".into(),
                ),
                e => file_error(
                    key_from,
                    format!("does not go with the certificate of --tls-cert: {e}"),
                ),
            })?;
        // No tickets, no resumption: every connection is a full handshake.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key)
            .map_err(config_err)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsIdentity {
            client: Arc::new(client),
            server: Arc::new(server),
            name,
            own: (chain, roots, cert_from.1.to_path_buf()),
        })
    }

    /// Checks this node's own certificate as its peer will: against the pair's CA, for the
    /// pair's name, valid now, for both TLS server and client use. A node whose certificate
    /// its peer would refuse says so when it starts, not at its first connection.
    ///
    /// # Errors
    ///
    /// [`TlsConfigError::File`] naming the certificate file and why the peer would refuse
    /// it (expired, another CA, another pair's name, a usage missing).
    pub fn check_own(&self) -> Result<(), TlsConfigError> {
        let (chain, roots, path) = &self.own;
        let now = UnixTime::now();
        let provider = Arc::new(link_provider());
        let refused = |e: rustls::Error| TlsConfigError::File {
            what: "--tls-cert",
            path: path.clone(),
            problem: format!(
                "the peer would refuse this node's certificate: {}",
                describe(&e).trim_start_matches("the peer's certificate is refused: ")
            ),
        };
        let as_server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsConfigError::Config(e.to_string()))?;
        as_server
            .verify_server_cert(&chain[0], &chain[1..], &self.name, &[], now)
            .map_err(refused)?;
        let as_client = PairClientVerifier {
            inner: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| TlsConfigError::Config(e.to_string()))?,
            name: self.name.clone(),
        };
        as_client
            .verify_client_cert(&chain[0], &chain[1..], now)
            .map_err(refused)?;
        Ok(())
    }

    /// The pair name both ends' certificates carry.
    pub fn name(&self) -> String {
        self.name.to_str().into_owned()
    }
}

/// The ring provider with AES-128-GCM first: both ends are lockstep, so the client's
/// first choice is the suite. AES-128-GCM is a TLS 1.3 suite of full standing (RFC 8446,
/// section 9.1, the one every implementation must have) and, with AES-NI, the fastest
/// here; AES-256-GCM and ChaCha20-Poly1305 stay acceptable.
fn link_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..provider::default_provider()
    }
}

/// A pair's certificates in PEM, as [`generate`] makes them.
#[derive(Debug, Clone)]
pub struct PairCertificates {
    /// The pair's CA certificate (`--tls-ca` of every node).
    pub ca: String,
    /// Each node's name, certificate (`--tls-cert`) and private key (`--tls-key`).
    pub nodes: Vec<(String, String, String)>,
}

/// Makes a new CA for the pair called `name` and a certificate for each of `nodes`, valid
/// from `not_before` to `not_after` (UNIX seconds). Each node certificate names the node
/// as its common name and the pair as its DNS subject alternative name, for both TLS
/// client and server use; keys are ECDSA P-256. The CA's key is not kept: a pair that
/// needs another node makes a new set.
///
/// # Errors
///
/// A `name` that is no DNS name, or a validity outside what X.509 can say.
pub fn generate(
    name: &str,
    nodes: &[&str],
    not_before: i64,
    not_after: i64,
) -> Result<PairCertificates, TlsConfigError> {
    let nodes: Vec<(&str, &str)> = nodes.iter().map(|n| (*n, name)).collect();
    generate_for(name, &nodes, not_before, not_after)
}

/// [`generate`] with each node's certificate issued for a pair name of its own.
fn generate_for(
    name: &str,
    nodes: &[(&str, &str)],
    not_before: i64,
    not_after: i64,
) -> Result<PairCertificates, TlsConfigError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    pair_name(name)?;
    let err = |e: rcgen::Error| TlsConfigError::Config(e.to_string());
    let time = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .map_err(|e| TlsConfigError::Config(format!("validity: {e}")))
    };
    let (from, until) = (time(not_before)?, time(not_after)?);
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("lockstep pair {name} CA"));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = from;
    ca.not_after = until;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let mut out = PairCertificates {
        ca: ca_cert.pem(),
        nodes: Vec::new(),
    };
    for (node, pair) in nodes {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(vec![pair.to_string()]).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, *node);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = from;
        p.not_after = until;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(err)?;
        out.nodes
            .push((node.to_string(), cert.pem(), key.serialize_pem()));
    }
    Ok(out)
}

/// The pair's name as the DNS name its certificates carry.
fn pair_name(name: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(name.to_string())
        .ok()
        .filter(|n| matches!(n, ServerName::DnsName(_)) && !name.ends_with('.'))
        .ok_or_else(|| TlsConfigError::Name(name.to_string()))
}

/// The server side's check of a client certificate: the webpki chain check against the
/// pair's CA, then the pair's name, with the same rule a client applies to a server.
#[derive(Debug)]
struct PairClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for PairClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::InvalidCertificate(cert_error(e)))?;
        cert.verify_is_valid_for_subject_name(&self.name)
            .map_err(|e| rustls::Error::InvalidCertificate(cert_error(e)))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn cert_error(e: webpki::Error) -> rustls::CertificateError {
    match e {
        webpki::Error::CertNotValidForName(_) => rustls::CertificateError::NotValidForName,
        other => rustls::CertificateError::Other(rustls::OtherError(Arc::new(other))),
    }
}

/// How the replication link is protected: mutual TLS, or nothing (`--insecure`).
#[derive(Debug, Clone)]
pub enum LinkSecurity {
    /// Mutual TLS 1.3 with the pair's certificates.
    Tls(Arc<TlsIdentity>),
    /// In clear and unauthenticated: anyone who reaches the backup's port can feed it a
    /// guest, and the guest's memory crosses the network readable. Chosen explicitly.
    Insecure,
}

/// The first byte of a TLS handshake record (RFC 8446, section 5.1: content type 22).
const TLS_HANDSHAKE: u8 = 0x16;

impl LinkSecurity {
    /// Whether the link is authenticated and encrypted.
    pub fn is_secure(&self) -> bool {
        matches!(self, LinkSecurity::Tls(_))
    }

    /// Connects to `addr` (giving the TCP connect up to `timeout`) and, for TLS, runs the
    /// client handshake (up to [`HANDSHAKE_TIMEOUT`]).
    ///
    /// # Errors
    ///
    /// [`TransportError::Connect`] when no TCP connection could be made (worth retrying
    /// while the peer starts); [`TransportError::Tls`] when the peer was reached but the
    /// handshake failed (its cause named; retrying would not help).
    pub fn connect(
        &self,
        addr: impl ToSocketAddrs,
        timeout: Duration,
    ) -> Result<Connection, TransportError> {
        let stream = crate::transport::connect_stream(addr, timeout)?;
        match self {
            LinkSecurity::Insecure => Connection::from_stream(stream),
            LinkSecurity::Tls(id) => {
                let peer = stream.peer_addr().ok();
                let conn = ClientConnection::new(id.client.clone(), id.name.clone())
                    .map_err(|e| tls_error(peer, &e.to_string()))?;
                let session = handshake(&stream, conn.into(), peer)?;
                Connection::from_tls_stream(stream, session)
            }
        }
    }

    /// Accepts one connection on `listener` and [`admit`](LinkSecurity::admit)s it.
    ///
    /// # Errors
    ///
    /// [`TransportError::Accept`] when accepting failed; else as [`LinkSecurity::admit`].
    pub fn accept(&self, listener: &TcpListener) -> Result<Connection, TransportError> {
        let (stream, peer) = listener.accept().map_err(TransportError::Accept)?;
        self.admit(stream, peer)
    }

    /// Admits an accepted connection from `peer`: for TLS, runs the server handshake (up to
    /// [`HANDSHAKE_TIMEOUT`]). A peer that speaks the other mode is told so when it can be:
    /// a primary in clear facing a TLS backup gets a `Refuse` frame saying TLS is required.
    ///
    /// # Errors
    ///
    /// [`TransportError::Tls`] for a peer that failed, whatever the reason (its handshake,
    /// the other mode, an error or a reset on its socket, silence): the peer is refused,
    /// the listener is as it was.
    pub fn admit(&self, stream: TcpStream, peer: SocketAddr) -> Result<Connection, TransportError> {
        let refused = |e: TransportError| match e {
            e @ TransportError::Tls { .. } => e,
            other => tls_error(Some(peer), &other.to_string()),
        };
        let first = first_byte(&stream, Some(peer)).map_err(refused)?;
        match self {
            LinkSecurity::Insecure => {
                if first == Some(TLS_HANDSHAKE) {
                    return Err(tls_error(
                        Some(peer),
                        "the peer started a TLS handshake, but this side runs --insecure \
                         (give both sides the same --tls-* options, or --insecure)",
                    ));
                }
                Connection::from_stream(stream).map_err(refused)
            }
            LinkSecurity::Tls(id) => {
                if first.is_some_and(|b| b != TLS_HANDSHAKE) {
                    let mut plain = Connection::from_stream(stream).map_err(refused)?;
                    let clear = first == MAGIC.to_le_bytes().first().copied();
                    let reason = if clear {
                        "this side requires TLS (--tls-cert, --tls-key, --tls-ca), the peer \
                         runs --insecure"
                    } else {
                        "this side requires TLS, and the peer speaks neither TLS nor lockstep"
                    };
                    if clear {
                        let _ = plain.send(&Message::Refuse {
                            reason: reason.into(),
                        });
                    }
                    return Err(tls_error(Some(peer), reason));
                }
                let conn = ServerConnection::new(id.server.clone())
                    .map_err(|e| tls_error(Some(peer), &e.to_string()))?;
                let session = handshake(&stream, conn.into(), Some(peer)).map_err(refused)?;
                Connection::from_tls_stream(stream, session).map_err(refused)
            }
        }
    }
}

/// The first byte the peer sends, without taking it (None: it closed without a byte).
fn first_byte(stream: &TcpStream, peer: Option<SocketAddr>) -> Result<Option<u8>, TransportError> {
    let io_err = |op, source| TransportError::Io { op, source };
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| io_err("setting a read timeout", e))?;
    let mut b = [0u8; 1];
    let r = loop {
        match stream.peek(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    stream
        .set_read_timeout(None)
        .map_err(|e| io_err("clearing a read timeout", e))?;
    match r {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(b[0])),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(tls_error(
                peer,
                &format!("the peer sent nothing within {HANDSHAKE_TIMEOUT:?}"),
            ))
        }
        Err(e) => Err(tls_error(
            peer,
            &format!("reading from the peer failed: {e}"),
        )),
    }
}

fn tls_error(peer: Option<SocketAddr>, cause: &str) -> TransportError {
    TransportError::Tls {
        peer: peer.map_or_else(|| "the peer".to_string(), |p| p.to_string()),
        cause: cause.to_string(),
    }
}

/// What a failed handshake means, said for an operator.
fn explain(e: &io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                "the peer closed the connection during the TLS handshake (does it run \
                 --insecure, or with another pair's certificates?)"
                    .into()
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("the TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}")
            }
            _ => format!("TLS handshake: {e}"),
        };
    };
    describe(tls)
}

/// A rustls error, said for an operator: a refused certificate (ours or the peer's), a
/// record that does not authenticate, or what rustls says.
pub(crate) fn describe(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(c) => {
            format!("the peer's certificate is refused: {}", cert_reason(c))
        }
        rustls::Error::NoCertificatesPresented => {
            "the peer presented no certificate (it needs --tls-cert and --tls-key)".into()
        }
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired
            | A::AccessDenied
            | A::DecryptError),
        ) => format!(
            "the peer refused this side's certificate (TLS alert {alert:?}): it was not \
             issued for this pair by the CA the peer trusts, or has expired"
        ),
        rustls::Error::AlertReceived(alert) => {
            format!("the peer ended the TLS session (alert {alert:?})")
        }
        rustls::Error::DecryptError | rustls::Error::PeerMisbehaved(_) => format!(
            "a record failed its check ({e}): the stream was altered, replayed or reordered \
             on the way"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateHandshakeMessage { .. } => {
            format!("the peer does not speak TLS as expected ({e}); does it run --insecure?")
        }
        other => format!("TLS: {other}"),
    }
}

fn cert_reason(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match c {
        C::UnknownIssuer | C::BadSignature => "not issued by this pair's CA (--tls-ca)".to_string(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "not issued for this pair's name (--name)".to_string()
        }
        C::Expired | C::ExpiredContext { .. } => format!("expired ({c})"),
        C::NotValidYet | C::NotValidYetContext { .. } => format!("not valid yet ({c})"),
        C::Revoked => "revoked".to_string(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            format!("not issued for both TLS client and server use ({c})")
        }
        C::Other(o) if o.to_string().contains("CaUsedAsEndEntity") => {
            "a CA certificate presented as a node's certificate".to_string()
        }
        C::Other(o) => o.to_string(),
        other => other.to_string(),
    }
}

/// Runs `session`'s handshake to its end on the blocking `stream`, within
/// [`HANDSHAKE_TIMEOUT`]. Data the peer sent right after its last handshake message stays
/// buffered in the session (the record layer reads it first).
fn handshake(
    stream: &TcpStream,
    mut session: rustls::Connection,
    peer: Option<SocketAddr>,
) -> Result<rustls::Connection, TransportError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let io_err = |op, source| TransportError::Io { op, source };
    let mut io = Deadlined { stream, deadline };
    while session.is_handshaking() {
        if let Err(e) = session.complete_io(&mut io) {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                return Err(TransportError::HandshakeTimeout {
                    peer: peer.map_or_else(|| "the peer".to_string(), |p| p.to_string()),
                    after: HANDSHAKE_TIMEOUT,
                });
            }
            // rustls queued an alert naming the cause; all of it goes out (rustls made one
            // attempt), then the peer gets the time to read it.
            while session.wants_write() && matches!(session.write_tls(&mut io), Ok(n) if n > 0) {}
            close_gently(stream);
            return Err(tls_error(peer, &explain(&e)));
        }
    }
    // The last flight (the client's Finished) goes out before the connection is used.
    while session.wants_write() {
        session
            .write_tls(&mut io)
            .map_err(|e| tls_error(peer, &explain(&e)))?;
    }
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|e| io_err("clearing the handshake timeouts", e))?;
    session.set_buffer_limit(None);
    Ok(session)
}

/// Ends the connection after a failed handshake so that the alert just sent reaches the
/// peer: closing a socket with unread bytes (the rest of the peer's flight) would send a
/// reset, which can overtake the alert. Sends FIN, then reads until the peer closes too,
/// for at most 200 ms.
fn close_gently(stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + Duration::from_millis(200);
    let mut sink = [0u8; 4096];
    let mut s = stream;
    while let Some(left) = until
        .checked_duration_since(Instant::now())
        .filter(|l| !l.is_zero())
    {
        if s.set_read_timeout(Some(left)).is_err() || !matches!(s.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// A blocking stream whose reads and writes give up at `deadline`.
struct Deadlined<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.set_write_timeout(Some(left))
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.stream;
        s.read(buf)
    }
}

impl io::Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.stream;
        s.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.stream;
        s.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Hello, MemoryRegion};
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::SystemTime;

    const PAIR: &str = "pair-a";

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn certs(nodes: &[(&str, &str)]) -> PairCertificates {
        generate_for(PAIR, nodes, now() - 3600, now() + 86400).unwrap()
    }

    fn identity(set: &PairCertificates, node: usize, name: &str) -> LinkSecurity {
        let (_, cert, key) = &set.nodes[node];
        let from = ("--tls-cert", Path::new("test"));
        LinkSecurity::Tls(Arc::new(
            TlsIdentity::from_pem(
                [
                    (cert.as_bytes(), from),
                    (key.as_bytes(), from),
                    (set.ca.as_bytes(), from),
                ],
                name,
            )
            .unwrap(),
        ))
    }

    type Both = (
        Result<Connection, TransportError>,
        Result<Connection, TransportError>,
    );

    /// The server side accepts on a thread; returns (server, client).
    fn connect(server: LinkSecurity, client: LinkSecurity) -> Both {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || server.accept(&l));
        let c = client.connect(addr, Duration::from_secs(5));
        // A refused client closes; the server's handshake ends then.
        let c = c.map(|mut c| {
            // Proves the client side usable: a message the server reads below.
            c.send(&Message::Heartbeat { epoch: 1 }).unwrap();
            c
        });
        (t.join().unwrap(), c)
    }

    fn cause(r: &Result<Connection, TransportError>) -> String {
        match r {
            Err(TransportError::Tls { cause, .. }) => cause.clone(),
            Err(e) => panic!("not a TLS error: {e}"),
            Ok(_) => panic!("the connection was accepted"),
        }
    }

    fn big_pages(epoch: u64, pages: u64) -> bytes::Bytes {
        let mut b = crate::protocol::PagesFrameBuilder::pages(epoch, 1 << 24);
        for i in 0..pages {
            let mut p = [0u8; crate::PAGE_SIZE];
            for (j, x) in p.iter_mut().enumerate() {
                // Varied enough that the page codec does not shrink it to nothing.
                *x = (j as u64 * 31 + i * 7) as u8 ^ (j >> 5) as u8;
            }
            b.push(i, |out| crate::codec::encode_page(&p, None, out));
        }
        b.finish()
    }

    #[test]
    fn mutual_tls_carries_frames_both_ways_on_split_halves() {
        let set = certs(&[("a", PAIR), ("b", PAIR)]);
        let (s, c) = connect(identity(&set, 0, PAIR), identity(&set, 1, PAIR));
        let (mut s, c) = (s.unwrap(), c.unwrap());
        assert!(s.is_secure() && c.is_secure());
        assert!(matches!(
            s.recv(Some(Duration::from_secs(5))).unwrap(),
            Message::Heartbeat { epoch: 1 }
        ));
        let frames: Vec<_> = (0..3).map(|e| big_pages(e, 300)).collect();
        let (mut c_tx, mut c_rx) = c.split();
        let sent = frames.clone();
        let tx = std::thread::spawn(move || {
            c_tx.send_frames(&sent).unwrap();
            c_tx.send(&Message::Hello(Hello::new(
                2,
                vec![MemoryRegion {
                    gpa: 0,
                    len: 1 << 24,
                }],
                9,
            )))
            .unwrap();
            c_tx
        });
        // Acks flow the other way meanwhile.
        for e in 0..3 {
            s.send(&Message::Ack { epoch: e }).unwrap();
        }
        for (e, f) in frames.iter().enumerate() {
            let got = s.recv(Some(Duration::from_secs(10))).unwrap();
            let mut again = bytes::BytesMut::new();
            got.encode(&mut again).unwrap();
            assert_eq!(&again[..], &f[..], "frame {e} arrived changed");
        }
        assert!(matches!(
            s.recv(Some(Duration::from_secs(5))).unwrap(),
            Message::Hello(_)
        ));
        for e in 0..3 {
            assert!(matches!(
                c_rx.recv(Some(Duration::from_secs(5))).unwrap(),
                Message::Ack { epoch } if epoch == e
            ));
        }
        tx.join().unwrap();
    }

    #[test]
    fn a_certificate_of_another_ca_is_refused_on_both_sides() {
        let ours = certs(&[("a", PAIR)]);
        let theirs = certs(&[("b", PAIR)]);
        let (s, c) = connect(identity(&ours, 0, PAIR), identity(&theirs, 0, PAIR));
        assert!(
            cause(&c).contains("not issued by this pair's CA"),
            "{}",
            cause(&c)
        );
        assert!(
            cause(&s).contains("refused this side's certificate"),
            "{}",
            cause(&s)
        );
    }

    #[test]
    fn a_certificate_for_another_pair_is_refused_even_from_the_same_ca() {
        // One CA, two pairs: node 1 holds a certificate for "pair-b".
        let set = certs(&[("a", PAIR), ("b", "pair-b")]);
        // The client of pair-b checks the server's name: not pair-b.
        let (s, c) = connect(identity(&set, 0, PAIR), identity(&set, 1, "pair-b"));
        assert!(
            cause(&c).contains("not issued for this pair's name"),
            "{}",
            cause(&c)
        );
        assert!(s.is_err());
        // A client with pair-b's certificate that expects pair-a: the server refuses it.
        let (s, c) = connect(identity(&set, 0, PAIR), identity(&set, 1, PAIR));
        assert!(
            cause(&s).contains("not issued for this pair's name"),
            "{}",
            cause(&s)
        );
        assert!(c.is_err() || c.is_ok_and(|mut c| c.recv(Some(Duration::from_secs(5))).is_err()));
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let stale = generate(PAIR, &["a", "b"], now() - 86400 * 10, now() - 86400).unwrap();
        let (s, c) = connect(identity(&stale, 0, PAIR), identity(&stale, 1, PAIR));
        assert!(cause(&c).contains("expired"), "{}", cause(&c));
        assert!(s.is_err());
        let fresh = generate(PAIR, &["a"], now() - 3600, now() + 3600).unwrap();
        // An expired client certificate (the server's is good): the server says so.
        let mut stale_ca_client = stale.clone();
        stale_ca_client.ca = fresh.ca.clone();
        let server = identity(
            &PairCertificates {
                ca: stale.ca.clone(),
                nodes: fresh.nodes.clone(),
            },
            0,
            PAIR,
        );
        let (s, _c) = connect(server, identity(&stale_ca_client, 1, PAIR));
        assert!(cause(&s).contains("expired"), "{}", cause(&s));
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let set = certs(&[("a", PAIR)]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = identity(&set, 0, PAIR);
        let t = std::thread::spawn(move || server.accept(&l));
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(set.ca.as_bytes()).unwrap())
            .unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tls = ClientConnection::new(Arc::new(config), PAIR.try_into().unwrap()).unwrap();
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The client's side of the handshake completes; the server refuses on its flight.
        let _ = tls.complete_io(&mut sock);
        let _ = tls.writer().write_all(b"LKSP");
        let _ = tls.complete_io(&mut sock);
        let s = t.join().unwrap();
        assert!(
            cause(&s).contains("presented no certificate"),
            "{}",
            cause(&s)
        );
    }

    #[test]
    fn a_primary_in_clear_is_told_the_backup_requires_tls() {
        let set = certs(&[("a", PAIR)]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = identity(&set, 0, PAIR);
        let t = std::thread::spawn(move || server.accept(&l));
        let mut c = LinkSecurity::Insecure
            .connect(addr, Duration::from_secs(5))
            .unwrap();
        let hello = Hello::new(
            1,
            vec![MemoryRegion {
                gpa: 0,
                len: 1 << 20,
            }],
            1,
        );
        let r = crate::handshake::primary_handshake(&mut c, &hello, Duration::from_secs(5));
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("requires TLS") && e.contains("--insecure"),
            "{e}"
        );
        assert!(cause(&t.join().unwrap()).contains("runs --insecure"));
    }

    #[test]
    fn a_tls_primary_facing_an_insecure_backup_fails_on_both_sides() {
        let set = certs(&[("a", PAIR)]);
        let (s, c) = connect(LinkSecurity::Insecure, identity(&set, 0, PAIR));
        assert!(
            cause(&s).contains("this side runs --insecure"),
            "{}",
            cause(&s)
        );
        assert!(
            cause(&c).contains("closed the connection during the TLS handshake"),
            "{}",
            cause(&c)
        );
    }

    #[test]
    fn bad_files_and_names_are_errors_that_name_them() {
        let set = certs(&[("a", PAIR)]);
        let from = |w| (w, Path::new("/x/f.pem"));
        let (_, cert, key) = &set.nodes[0];
        let load = |c: &str, k: &str, a: &str, name: &str| {
            TlsIdentity::from_pem(
                [
                    (c.as_bytes(), from("--tls-cert")),
                    (k.as_bytes(), from("--tls-key")),
                    (a.as_bytes(), from("--tls-ca")),
                ],
                name,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(
            load(key, key, &set.ca, PAIR).starts_with("--tls-cert /x/f.pem: holds no certificate")
        );
        assert!(load(cert, cert, &set.ca, PAIR)
            .starts_with("--tls-key /x/f.pem: holds no usable private key"));
        assert!(
            load(cert, key, "junk", PAIR).starts_with("--tls-ca /x/f.pem: holds no certificate")
        );
        assert!(load(cert, key, &set.ca, "a pair").contains("cannot name a TLS certificate"));
        let other = certs(&[("b", PAIR)]);
        let e = load(cert, &other.nodes[0].2, &set.ca, PAIR);
        assert!(
            e.starts_with("--tls-key /x/f.pem: does not go with the certificate"),
            "{e}"
        );
        let e = TlsIdentity::load(
            Path::new("/nonexistent/c"),
            Path::new("k"),
            Path::new("a"),
            PAIR,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--tls-cert /nonexistent/c: No such file"),
            "{e}"
        );
    }
}
