//! One function per path: each measures a baseline and the daemon back to back and records
//! the figures, with their ratio and target, in the report.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use keyward::Client;
use keyward_tests::credentials;

use crate::fill;
use crate::measure::{compare, median, run_bursts, run_clients, Pick, Sample};
use crate::raw;
use crate::raw::pkcs11::{Alg, RawSigner};
use crate::report::{Goal, Report, Unit};
use crate::world::{
    clients_label, connect, Daemon, SlotDaemon, World, CREDENTIAL, CREDENTIAL_ID, SECRET,
    SIGN_DATA, UNIT,
};
use crate::Settings;

/// GetSecret over persistent Varlink connections vs the same client against an echo server.
pub fn get_secret(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let echo = w.scratch.path().join("echo.sock");
    let _server = raw::servers::EchoProcess::start(&echo)?;
    let op = |c: &mut Client| -> Result<()> {
        let reply = c.get_secret("bench/secret", None)?;
        ensure!(
            reply.value.expose() == SECRET,
            "GetSecret returned another value"
        );
        Ok(())
    };
    for n in [1, 32] {
        let mut base = connect(&echo, n)?;
        let mut kw = w.kw.clients(n)?;
        let c = compare(
            s.plan,
            |d| run_clients(&mut base, d, op),
            |d| run_clients(&mut kw, d, op),
        )?;
        let path = format!("GetSecret over Varlink, {}", clients_label(n));
        let goals = (Goal::AtLeast(0.6), Goal::AtMost(2.0));
        let (b, _) = r.rate_and_p99(&path, "NUL-framed JSON echo", "echo", c, goals);
        match n {
            1 => w.echo_rate.one = Some(b.rate),
            _ => w.echo_rate.busy = Some(b.rate),
        }
    }
    Ok(())
}

/// The most any daemon could do here: the raw operation and one Unix-socket round trip per
/// request, as a daemon that cost nothing would. For one client (`clients` 1) they run back
/// to back, so their times add up (the echo's rate at one client); for more, every core is
/// busy and their CPU adds up (the echo's rate at 32 clients, with its clients' share). An
/// info row: how much of that Keyward reaches, the baseline's name saying how far below the
/// raw operation alone the ceiling itself lies.
fn ceiling_row(
    w: &World,
    r: &mut Report,
    path: &str,
    raw_name: &str,
    clients: usize,
    (raw, keyward): (f64, f64),
) {
    let (echo, what) = match clients {
        1 => (w.echo_rate.one, "one echo round trip"),
        _ => (w.echo_rate.busy, "one echo round trip's CPU"),
    };
    let Some(echo) = echo.filter(|e| *e > 0.0 && raw > 0.0) else {
        return;
    };
    let ceiling = 1.0 / (1.0 / raw + 1.0 / echo);
    r.row(
        path,
        "throughput",
        &format!(
            "{raw_name} + {what} (the ceiling: {:.2} of the raw alone)",
            ceiling / raw
        ),
        Unit::PerSec,
        (ceiling, keyward),
        &[],
        Goal::Info,
    );
}

/// Sign in SoftHSM through the daemon vs `C_Sign` on sessions of this process.
pub fn sign_softhsm(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    for (alg, key, label) in [
        (Alg::EcdsaP256, "p256-hsm", "ECDSA P-256"),
        (Alg::Ed25519, "ed25519-hsm", "Ed25519"),
    ] {
        for n in [1, 2] {
            let mut base = (0..n)
                .map(|_| w.raw.signer(alg))
                .collect::<Result<Vec<RawSigner>>>()?;
            let mut kw = w.kw.clients(n)?;
            let c = compare(
                s.plan,
                |d| {
                    run_clients(&mut base, d, |x: &mut RawSigner| {
                        x.sign(SIGN_DATA).map(drop)
                    })
                },
                |d| {
                    run_clients(&mut kw, d, |c: &mut Client| {
                        c.sign(key, SIGN_DATA, false)?;
                        Ok(())
                    })
                },
            )?;
            let pairs = c.pairs;
            let (b, k) = (c.base.stats(), c.keyward.stats());
            let path = format!("Sign {label} in SoftHSM, {}", clients_label(n));
            let raw_name = format!(
                "cryptoki C_Sign, {n} session{}",
                if n == 1 { "" } else { "s" }
            );
            r.row(
                &path,
                "throughput",
                &raw_name,
                Unit::PerSec,
                (b.rate, k.rate),
                &pairs,
                Goal::AtLeast(0.9),
            );
            r.latency(&path, "C_Sign", b, k);
            ceiling_row(w, r, &path, &raw_name, n, (b.rate, k.rate));
        }
    }
    Ok(())
}

/// Sign in swtpm through the daemon vs a tss-esapi loop on a second swtpm.
pub fn sign_tpm(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let mut base = vec![raw::tpm::RawTpmSigner::open(w.raw_tpm.port())?];
    let mut kw = w.kw.clients(1)?;
    let c = compare(
        s.plan,
        |d| {
            run_clients(&mut base, d, |x: &mut raw::tpm::RawTpmSigner| {
                x.sign(SIGN_DATA).map(drop)
            })
        },
        |d| {
            run_clients(&mut kw, d, |c: &mut Client| {
                c.sign("p256-tpm", SIGN_DATA, false)?;
                Ok(())
            })
        },
    )?;
    let pairs = c.pairs;
    let (b, k) = (c.base.stats(), c.keyward.stats());
    let path = "Sign ECDSA P-256 in swtpm, 1 client";
    let raw_name = "tss-esapi TPM2_Sign, password session";
    r.row(
        path,
        "throughput",
        raw_name,
        Unit::PerSec,
        (b.rate, k.rate),
        &pairs,
        Goal::AtLeast(0.9),
    );
    r.latency(path, "TPM2_Sign", b, k);
    ceiling_row(w, r, path, raw_name, 1, (b.rate, k.rate));
    Ok(())
}

/// One ssh-agent connection that signs [`SIGN_DATA`] with one key, as ssh and git do.
struct AgentSigner {
    stream: std::os::unix::net::UnixStream,
    request: Vec<u8>,
}

impl AgentSigner {
    fn sign(&mut self) -> Result<()> {
        use std::io::{Read as _, Write as _};
        self.stream.write_all(&self.request)?;
        let mut header = [0u8; 4];
        self.stream.read_exact(&mut header)?;
        let mut reply = vec![0u8; u32::from_be_bytes(header) as usize];
        self.stream.read_exact(&mut reply)?;
        ensure!(
            reply.first() == Some(&keyward::ssh::SIGN_RESPONSE),
            "the agent answered {:?}, not a signature",
            reply.first()
        );
        Ok(())
    }
}

/// Ed25519 in SoftHSM through the ssh-agent socket (SIGN_REQUEST on a kept connection: policy,
/// audit, the SSH signature form) vs `C_Sign` on a session of this process.
pub fn sign_ssh_agent(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let key = "ed25519-hsm";
    let der = w.kw.clients(1)?.remove(0).public_key(key)?;
    let public = keyward::ssh::public_key(keyward::api::KeyAlgorithm::Ed25519, &der)?;
    let request = keyward::ssh::SignRequest {
        key_blob: keyward::ssh::key_blob(&public)?,
        data: SIGN_DATA.to_vec(),
        flags: 0,
    };
    let request = keyward::ssh::framed(&request.encode()?);
    let mut base = vec![w.raw.signer(Alg::Ed25519)?];
    let mut agent = vec![AgentSigner {
        stream: std::os::unix::net::UnixStream::connect(w.kw.keywardd.ssh_agent_socket())?,
        request,
    }];
    let c = compare(
        s.plan,
        |d| {
            run_clients(&mut base, d, |x: &mut RawSigner| {
                x.sign(SIGN_DATA).map(drop)
            })
        },
        |d| run_clients(&mut agent, d, AgentSigner::sign),
    )?;
    let pairs = c.pairs;
    let (b, k) = (c.base.stats(), c.keyward.stats());
    let path = "ssh-agent SIGN_REQUEST, Ed25519 in SoftHSM, 1 client";
    let raw_name = "cryptoki C_Sign, 1 session";
    r.row(
        path,
        "throughput",
        raw_name,
        Unit::PerSec,
        (b.rate, k.rate),
        &pairs,
        Goal::AtLeast(0.9),
    );
    r.latency(path, "C_Sign", b, k);
    ceiling_row(w, r, path, raw_name, 1, (b.rate, k.rate));
    Ok(())
}

/// Bursts of concurrent systemd-style fetches from the daemon's credential socket vs a server
/// that only accepts and writes.
pub fn credential_fetches(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let raw_path = w.scratch.path().join("credentials.sock");
    raw::servers::start_credentials(w.rt.handle(), &raw_path, CREDENTIAL)?;
    let kw_path = w.kw.keywardd.credentials_socket();
    let fetch = |path: &Path| -> Result<()> {
        let value = credentials::fetch(path, UNIT, CREDENTIAL_ID)?;
        ensure!(
            value == CREDENTIAL,
            "a credential fetch got {} bytes",
            value.len()
        );
        Ok(())
    };
    let c = compare(
        s.plan,
        |d| run_bursts(s.fetchers, d, || fetch(&raw_path)),
        |d| run_bursts(s.fetchers, d, || fetch(&kw_path)),
    )?;
    let pairs = c.pairs;
    let (b, k) = (c.base.stats(), c.keyward.stats());
    let path = format!("{} concurrent credential-socket fetches", s.fetchers);
    let raw_name = "accept + write on a Unix socket";
    r.row(
        &path,
        "throughput",
        raw_name,
        Unit::PerSec,
        (b.rate, k.rate),
        &pairs,
        Goal::AtLeast(0.5),
    );
    r.latency(&path, "accept + write", b, k);
    Ok(())
}

/// Durable PutSecret vs single-row WAL commits on the same filesystem, by one client and by
/// eight: the daemon's writes queued together commit together, where eight raw writers each
/// commit their own.
pub fn put_secret(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("raw-sqlite-")
        .tempdir_in(w.kw.keywardd.dir())?;
    let db = dir.path().join("raw.db");
    let first = raw::sqlite::RawCommits::create(&db)?;
    let mut kw = w.kw.clients(1)?;
    // Steady state for the daemon too: its WAL has seen little so far, and a growing WAL costs
    // a filesystem-journal commit per fsync (see `raw::sqlite`). 5 MiB of secrets grow it past
    // a checkpoint.
    let big = vec![0x17u8; keyward::api::MAX_SECRET_LEN];
    for _ in 0..5 {
        kw[0].put_secret("bench/wal-warm-up", &big)?;
    }
    // The size of a stored 32-byte secret: nonce, ciphertext, tag.
    let row = [0x42u8; 72];
    let mut base = vec![first];
    for (n, goal) in [(1, 0.8), (8, 1.0)] {
        while base.len() < n {
            base.push(raw::sqlite::RawCommits::open(&db, base.len())?);
        }
        let mut kw = w.kw.clients(n)?;
        let c = compare(
            s.plan,
            |d| {
                run_clients(&mut base, d, |x: &mut raw::sqlite::RawCommits| {
                    x.commit_one(&row)
                })
            },
            |d| {
                run_clients(&mut kw, d, |c: &mut Client| {
                    c.put_secret("bench/put", SECRET)?;
                    Ok(())
                })
            },
        )?;
        let pairs = c.pairs;
        let (b, k) = (c.base.stats(), c.keyward.stats());
        let path = format!("PutSecret, durable, {}", clients_label(n));
        let raw_name = if n == 1 {
            "SQLite WAL FULL single-row commit".to_owned()
        } else {
            format!("{n} SQLite connections, a single-row commit each")
        };
        r.row(
            &path,
            "throughput",
            &raw_name,
            Unit::PerSec,
            (b.rate, k.rate),
            &pairs,
            Goal::AtLeast(goal),
        );
        r.latency(&path, "SQLite commit", b, k);
        if n == 1 {
            ceiling_row(w, r, &path, &raw_name, 1, (b.rate, k.rate));
        }
    }
    Ok(())
}

/// Spawn → `READY=1` with the unattended TPM unseal vs the bare unseal path, alternating.
pub fn startup(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let unseal = raw::tpm::RawUnseal::prepare(&w.raw_tpm.tcti())?;
    unseal.unseal_once()?;
    w.kw.timed_restart()?;
    let (mut raw_times, mut kw_times) = (Vec::new(), Vec::new());
    for _ in 0..s.restarts {
        let t = Instant::now();
        unseal.unseal_once()?;
        raw_times.push(t.elapsed());
        kw_times.push(w.kw.timed_restart()?);
    }
    let pairs: Vec<f64> = raw_times
        .iter()
        .zip(&kw_times)
        .map(|(raw, kw)| kw.as_secs_f64() / raw.as_secs_f64())
        .collect();
    r.row(
        "keywardd start → READY=1, unsealed from swtpm",
        &format!("median of {}", s.restarts),
        "raw unseal: connect + SRK + load + policy + unseal",
        Unit::Secs,
        (median(&raw_times), median(&kw_times)),
        &pairs,
        Goal::AtMost(4.0),
    );
    r.latency(
        "keywardd start → READY=1",
        "raw unseal",
        sample(&raw_times).stats(),
        sample(&kw_times).stats(),
    );
    Ok(())
}

/// Spawn → `READY=1` of two daemons alike but for their one tpm2 keyslot: bound to literal PCR
/// 7, or also to a PCR 11 policy signed with `systemd-measure sign` (its unseal adds reading
/// the signature file, LoadExternal, VerifySignature and PolicyAuthorize), alternating.
pub fn signed_startup(_w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let mut literal = SlotDaemon::start(false)?;
    let mut signed = SlotDaemon::start(true)?;
    literal.timed_restart()?;
    signed.timed_restart()?;
    let (mut literal_times, mut signed_times) = (Vec::new(), Vec::new());
    for _ in 0..s.restarts {
        literal_times.push(literal.timed_restart()?);
        signed_times.push(signed.timed_restart()?);
    }
    let pairs: Vec<f64> = literal_times
        .iter()
        .zip(&signed_times)
        .map(|(l, s)| s.as_secs_f64() / l.as_secs_f64())
        .collect();
    r.row(
        "keywardd start → READY=1, unsealed by a signed PCR 11 policy",
        &format!("median of {}", s.restarts),
        "keywardd unsealed by literal PCR 7",
        Unit::Secs,
        (median(&literal_times), median(&signed_times)),
        &pairs,
        Goal::AtMost(1.5),
    );
    r.latency_sides(
        "keywardd start → READY=1",
        ("literal PCRs", sample(&literal_times).stats()),
        ("signed PCR policy", sample(&signed_times).stats()),
    );
    Ok(())
}

/// A few timings as a sample (for their percentiles).
fn sample(times: &[Duration]) -> Sample {
    Sample {
        ops: times.len() as u64,
        wall: times.iter().sum(),
        lat_ns: times.iter().map(|t| t.as_nanos() as u64).collect(),
    }
}

/// GetSecret of a random one of the first `n` filled secrets, checking the value.
fn get_random(n: u64) -> impl Fn(&mut (Client, Pick)) -> Result<()> + Sync {
    move |(c, pick)| {
        let i = pick.below(n);
        let reply = c.get_secret(&fill::name(i), None)?;
        ensure!(
            reply.value.expose() == fill::value(i),
            "secret {i} read back wrong"
        );
        Ok(())
    }
}

/// A vault of 1M secrets vs one of 1k, each in its own daemon (with its own devices), measured
/// alternately like every other comparison: start-up, GetSecret latency on random names (each
/// value checked), rekey, and peak RSS after the same sequence of work.
pub fn scale(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let mut small = Daemon::start("small")?;
    for (d, n) in [(&mut small, s.small), (&mut w.kw, s.large)] {
        if let Some(took) = d.fill_to(n)? {
            r.note(format!(
                "filled a vault to {n} secrets in {:.1} s ({:.0} PutSecret/s, pipelined over \
                 {} connections)",
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64(),
                fill::CONNECTIONS
            ));
        }
    }
    let (n_small, n_large) = (small.filled(), w.kw.filled());
    let (mut starts, mut start_pairs) = (Vec::new(), Vec::new());
    for _ in 0..s.restarts {
        let (a, b) = (small.timed_restart()?, w.kw.timed_restart()?);
        start_pairs.push(b.as_secs_f64() / a.as_secs_f64());
        starts.push((a, b));
    }
    let mut cs: Vec<(Client, Pick)> = vec![(small.clients(1)?.remove(0), Pick::new(n_small))];
    let mut cl: Vec<(Client, Pick)> = vec![(w.kw.clients(1)?.remove(0), Pick::new(n_large))];
    let c = compare(
        s.plan,
        |d| run_clients(&mut cs, d, get_random(n_small)),
        |d| run_clients(&mut cl, d, get_random(n_large)),
    )?;
    let get_pairs = c.p50_pairs;
    let (get_small, get_large) = (c.base.stats(), c.keyward.stats());
    let (mut rekeys, mut rekey_pairs) = (Vec::new(), Vec::new());
    for _ in 0..s.rekeys {
        let a = small.rekey(&mut cs[0].0)?;
        let b = w.kw.rekey(&mut cl[0].0)?;
        rekey_pairs.push(b.as_secs_f64() / a.as_secs_f64());
        rekeys.push((a, b));
    }
    let (rss_small, rss_large) = (small.track_rss()?, w.kw.track_rss()?);
    let k = |n: u64| {
        if n % 1_000_000 == 0 {
            format!("{}M", n / 1_000_000)
        } else if n % 1000 == 0 {
            format!("{}k", n / 1000)
        } else {
            n.to_string()
        }
    };
    let path = |what: &str| format!("{what} at {} vs {} secrets", k(n_large), k(n_small));
    let base = format!("keywardd with {}", k(n_small));
    let medians = |v: &[(Duration, Duration)]| {
        let (a, b): (Vec<Duration>, Vec<Duration>) = v.iter().copied().unzip();
        (median(&a), median(&b))
    };
    r.row(
        &path("GetSecret p50, random names, 1 client"),
        "p50 latency",
        &base,
        Unit::Secs,
        (get_small.p50, get_large.p50),
        &get_pairs,
        Goal::AtMost(1.5),
    );
    r.row(
        &path("start-up → READY=1"),
        &format!("median of {}", s.restarts),
        &base,
        Unit::Secs,
        medians(&starts),
        &start_pairs,
        Goal::AtMost(1.2),
    );
    r.row(
        &path("rekey"),
        &format!("median of {}", s.rekeys),
        &base,
        Unit::Secs,
        medians(&rekeys),
        &rekey_pairs,
        Goal::AtMost(1.5),
    );
    r.row(
        &path("keywardd RSS"),
        "VmHWM after the same work",
        &base,
        Unit::Bytes,
        (rss_small as f64, rss_large as f64),
        &[],
        Goal::AtMost(1.2),
    );
    r.latency_sides(
        "GetSecret, random names, 1 client",
        (&format!("keywardd with {}", k(n_small)), get_small),
        (&format!("keywardd with {}", k(n_large)), get_large),
    );
    Ok(())
}

/// Encrypt and Decrypt with a transit key over Varlink vs GetSecret on the same connections
/// (the same transport and one AEAD open of a stored value), with the vault's AEAD alone, in
/// this process, as a note.
pub fn transit(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    use keyward::api::{methods, DecryptParams, EncryptParams, SecretValue};
    let encrypt = |c: &mut Client| -> Result<String> {
        let reply = c.request::<methods::Encrypt>(&EncryptParams {
            name: "bench-transit".try_into()?,
            plaintext: SecretValue::new(SECRET.to_vec()),
            associated_data: None,
        })?;
        Ok(reply.ciphertext)
    };
    let ciphertext = encrypt(&mut w.kw.clients(1)?[0])?;
    let get = |c: &mut Client| -> Result<()> {
        c.get_secret("bench/secret", None)?;
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
    for (label, op) in [
        (
            "Encrypt",
            &(|c: &mut Client| encrypt(c).map(drop)) as &(dyn Fn(&mut Client) -> Result<()> + Sync),
        ),
        ("Decrypt", &decrypt),
    ] {
        let mut base = w.kw.clients(1)?;
        let mut kw = w.kw.clients(1)?;
        let c = compare(
            s.plan,
            |d| run_clients(&mut base, d, get),
            |d| run_clients(&mut kw, d, op),
        )?;
        let (b, k) = (c.base.stats(), c.keyward.stats());
        let path = format!("transit {label} of 32 B over Varlink, 1 client");
        r.row(
            &path,
            "throughput",
            "GetSecret over Varlink",
            Unit::PerSec,
            (b.rate, k.rate),
            &c.pairs,
            Goal::AtLeast(0.7),
        );
        r.latency(&path, "GetSecret", b, k);
    }
    // The AEAD itself (XChaCha20-Poly1305 seal of 32 B), for scale.
    let key = keywardd::vault::crypto::Key32::random();
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < s.plan.slice {
        keywardd::vault::crypto::seal(&key, b"aad", SECRET)?;
        n += 1;
    }
    r.note(format!(
        "the vault's AEAD alone (XChaCha20-Poly1305 seal of 32 B, one thread, no IPC): {:.0}/s",
        n as f64 / start.elapsed().as_secs_f64()
    ));
    Ok(())
}
