//! The upstream's HTTPS client: TLS 1.3 (rustls, ring) to the OpenBao server, the machine's
//! client certificate signed for in the device that holds its key, and HTTP/1.1 (hyper) over
//! that one connection, request after request.
//!
//! It owns the TLS configuration (the CA that the server's certificate must chain to, the
//! machine's certificate, and [`DeviceKey`], the `rustls` signing key whose every signature
//! is the vault's `sign` on the device), the connection, and the bounds: connecting, the
//! handshake and every request are timed out, a response body is read up to
//! [`MAX_RESPONSE`]. It must not hold, read or ask for a private key (there is none in this
//! process: the key never leaves its TPM or token), log a body (bodies carry secrets and
//! tokens), or decide what a response means (`login.rs`, `sync.rs` do).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use keyward_proto::api::{KeyAlgorithm, KeyName};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::{CertifiedKey, Signer, SigningKey, SingleCertAndKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use super::UpstreamError;
use crate::config::{UpstreamServer, UpstreamSettings};
use crate::service::Service;

/// Largest response body read, in bytes: a KV secret is at most 1 MiB, as JSON a little more.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// The machine's key, in its device: `rustls` asks it for the handshake's `CertificateVerify`
/// signature, and it asks the vault, which asks the device.
///
/// rustls signs synchronously, inside the handshake, which `tokio_rustls` drives from a task
/// on a runtime worker; the device is an actor reached through async channels (its own thread
/// owns the device context). So [`Signer::sign`] leaves the worker with
/// [`tokio::task::block_in_place`] (the runtime moves this worker's other tasks to another
/// thread and starts a replacement worker if needed, so nothing else waits) and waits there,
/// with [`tokio::runtime::Handle::block_on`], for the vault's `sign`. That is one device
/// call per handshake, and there is one handshake per sync. `block_in_place` needs the
/// multi-threaded runtime (keywardd's): on any other the signature is refused with an error
/// that says so, rather than blocking a single-threaded runtime on itself.
#[derive(Clone)]
pub struct DeviceKey {
    service: Arc<Service>,
    key: KeyName,
    ed25519: bool,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey")
            .field("key", &self.key)
            .field("ed25519", &self.ed25519)
            .finish_non_exhaustive()
    }
}

impl DeviceKey {
    /// The vault's key `key`.
    ///
    /// # Errors
    /// The key is not in the vault (or the vault is sealed), or is of an algorithm TLS 1.3
    /// client authentication can't use here (RSA: use ECDSA P-256 or Ed25519).
    pub async fn new(service: Arc<Service>, key: KeyName) -> Result<Self, UpstreamError> {
        let keys = service
            .vault()
            .list_keys()
            .await
            .map_err(|e| UpstreamError::Local(e.to_string()))?;
        let Some(info) = keys.into_iter().find(|k| k.name == key.as_str()) else {
            return Err(UpstreamError::Identity(format!(
                "the vault has no key {key}: create it with `keyward key create {key} --device DEVICE --algorithm ecdsa-p256`"
            )));
        };
        let ed25519 = match info.algorithm {
            KeyAlgorithm::Ed25519 => true,
            KeyAlgorithm::EcdsaP256 => false,
            KeyAlgorithm::RsaPss2048 | KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPkcs1_3072 => {
                return Err(UpstreamError::Identity(format!(
                    "key {key} is {}: the machine identity is an ecdsa-p256 or ed25519 key",
                    info.algorithm
                )))
            }
        };
        Ok(Self {
            service,
            key,
            ed25519,
        })
    }

    fn scheme(&self) -> SignatureScheme {
        if self.ed25519 {
            SignatureScheme::ED25519
        } else {
            SignatureScheme::ECDSA_NISTP256_SHA256
        }
    }
}

impl SigningKey for DeviceKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&self.scheme())
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        if self.ed25519 {
            SignatureAlgorithm::ED25519
        } else {
            SignatureAlgorithm::ECDSA
        }
    }
}

impl Signer for DeviceKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        // ECDSA_NISTP256_SHA256 is an X9.62 DER signature over SHA-256(message), which is what
        // the vault's prehashed `sign` returns for a P-256 key; Ed25519 signs the message.
        let (data, prehashed) = if self.ed25519 {
            (message.to_vec(), false)
        } else {
            (Sha256::digest(message).to_vec(), true)
        };
        let handle = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the device signature needs the multi-threaded runtime".into(),
                )
            })?;
        let service = Arc::clone(&self.service);
        let key = self.key.clone();
        tokio::task::block_in_place(move || {
            handle.block_on(async move { service.vault().sign(key, data, prehashed, None).await })
        })
        .map_err(|e| rustls::Error::General(format!("the device did not sign: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        DeviceKey::scheme(self)
    }
}

/// Where and how to connect: built from the settings and the files they name, fresh for every
/// sync (so a renewed certificate is picked up without a restart).
#[derive(Debug)]
pub struct Client {
    config: Arc<rustls::ClientConfig>,
    server: ServerName<'static>,
    host: String,
    port: u16,
    /// `host:port`, the `Host` header.
    authority: HeaderValue,
    timeout: Duration,
}

fn read_pem_certs(
    what: &str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| UpstreamError::Identity(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(UpstreamError::Identity(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

impl Client {
    /// A client of `server` for `settings`, proving the machine's identity with `key`.
    ///
    /// # Errors
    /// The CA or certificate file can't be read or holds no certificate.
    pub fn new(
        settings: &UpstreamSettings,
        server: &UpstreamServer,
        key: DeviceKey,
    ) -> Result<Self, UpstreamError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_pem_certs("upstream.ca_file", &settings.ca_file)? {
            roots
                .add(ca)
                .map_err(|e| UpstreamError::Identity(format!("upstream.ca_file: {e}")))?;
        }
        let chain = read_pem_certs("upstream.cert_file", &settings.cert_file)?;
        let resolver: Arc<dyn ResolvesClientCert> = Arc::new(SingleCertAndKey::from(
            CertifiedKey::new(chain, Arc::new(key)),
        ));
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| UpstreamError::Identity(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(resolver);
        let name = ServerName::try_from(server.host.clone())
            .map_err(|e| UpstreamError::Identity(format!("upstream.address: {e}")))?;
        let authority = if server.host.contains(':') {
            format!("[{}]:{}", server.host, server.port)
        } else {
            format!("{}:{}", server.host, server.port)
        };
        Ok(Self {
            config: Arc::new(config),
            server: name,
            host: server.host.clone(),
            port: server.port,
            authority: HeaderValue::from_str(&authority)
                .map_err(|e| UpstreamError::Identity(format!("upstream.address: {e}")))?,
            timeout: settings.request_timeout,
        })
    }

    /// Connect, shake hands (the device signs once) and set up HTTP/1.1.
    ///
    /// # Errors
    /// The server can't be reached, the handshake fails (a certificate either side doesn't
    /// accept, a device that did not sign), or it takes longer than the request timeout.
    pub async fn connect(&self) -> Result<Connection, UpstreamError> {
        let within = self.timeout;
        let tcp = tokio::time::timeout(within, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| UpstreamError::Timeout("connecting"))?
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let tls = tokio::time::timeout(
            within,
            TlsConnector::from(Arc::clone(&self.config)).connect(self.server.clone(), tcp),
        )
        .await
        .map_err(|_| UpstreamError::Timeout("the TLS handshake"))?
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        let (send, conn) = tokio::time::timeout(
            within,
            hyper::client::conn::http1::handshake(TokioIo::new(tls)),
        )
        .await
        .map_err(|_| UpstreamError::Timeout("the HTTP handshake"))?
        .map_err(|e| UpstreamError::Http(e.to_string()))?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection: {e}");
            }
        });
        Ok(Connection {
            send,
            authority: self.authority.clone(),
            timeout: within,
            task,
        })
    }
}

/// A response: its status and its body, zeroized when dropped (it may hold a secret or a
/// token).
pub struct Answer {
    pub status: StatusCode,
    pub body: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("body", &format_args!("{} bytes", self.body.len()))
            .finish()
    }
}

impl Answer {
    /// OpenBao's `{"errors": [...]}`, joined, for an error message (never a body otherwise).
    pub fn errors(&self) -> String {
        #[derive(serde::Deserialize)]
        struct Errors {
            #[serde(default)]
            errors: Vec<String>,
        }
        let said = serde_json::from_slice::<Errors>(&self.body)
            .map(|e| e.errors.join("; "))
            .unwrap_or_default();
        if said.is_empty() {
            self.status.to_string()
        } else {
            format!("{}: {said}", self.status)
        }
    }
}

/// One HTTP/1.1 connection over the TLS session: requests one after another.
#[derive(Debug)]
pub struct Connection {
    send: SendRequest<Full<Bytes>>,
    authority: HeaderValue,
    timeout: Duration,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    /// `method path` (`path` starts with `/v1/`), with the token and a JSON body if given.
    ///
    /// # Errors
    /// The connection failed, the response took longer than the timeout, or its body is
    /// larger than [`MAX_RESPONSE`].
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, UpstreamError> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.authority.clone());
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(token)
                .map_err(|_| UpstreamError::Response("the token is not a header value".into()))?;
            value.set_sensitive(true);
            request = request.header("X-Vault-Token", value);
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        let exchange = async {
            self.send
                .ready()
                .await
                .map_err(|e| UpstreamError::Http(e.to_string()))?;
            let response = self
                .send
                .send_request(request)
                .await
                .map_err(|e| UpstreamError::Http(e.to_string()))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| UpstreamError::Http(format!("reading the response: {e}")))?
                .to_bytes();
            let answer = Answer {
                status,
                body: Zeroizing::new(body.to_vec()),
            };
            // Sealed, standing by with no active node, or failing: this node, not the request.
            if status.is_server_error() {
                return Err(UpstreamError::Unavailable(answer.errors()));
            }
            Ok(answer)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout("a request"))?
    }
}
