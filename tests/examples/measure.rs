//! Quick measurements of keywardd against the raw devices, for a closing note or a sanity
//! check (the full benchmark with ratios and percentiles is a separate program): start-up to
//! `READY=1` with an unattended TPM unseal, GetSecret over one persistent connection, ECDSA
//! P-256 signing through the daemon next to a raw cryptoki loop, and rekey time with 1k and 10k
//! secrets stored.
//!
//! `cargo run --release -p keyward-tests --example measure` (after `cargo build --release --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use hsm_shim::pkcs11::Pkcs11Device;
use hsm_shim::{KeyAlgorithm, KeySpec, SignInput, Signer};
use keyward::Client;
use keyward_tests::keywardd::Setup;
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;

fn rate(what: &str, dur: Duration, mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        op();
        n += 1;
    }
    let r = n as f64 / start.elapsed().as_secs_f64();
    println!("{what:<46} {r:>10.0} ops/s");
    r
}

fn main() {
    let raw_token = SoftHsm::new("raw");
    // Single-threaded here, before the module loads.
    std::env::set_var("SOFTHSM2_CONF", raw_token.conf());
    let mut raw = Pkcs11Device::open(raw_token.config()).unwrap();
    let raw_key = raw
        .generate(&KeySpec {
            label: "raw".into(),
            algorithm: KeyAlgorithm::EcdsaP256,
        })
        .unwrap();

    let tpm = Swtpm::start();
    let token = SoftHsm::new("measure");
    let mut d = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .unseal_order(&["tpm"])
        .start();
    let mut c = Client::connect(d.socket()).unwrap();
    let spec = |kind: &str, device: Option<&str>| keyward::api::SlotSpec {
        kind: kind.into(),
        device: device.map(str::to_owned),
        ..Default::default()
    };
    c.init(vec![spec("tpm2", Some("tpm")), spec("pkcs11", Some("hsm"))])
        .unwrap();
    c.put_secret("bench/secret", &[7u8; 32]).unwrap();
    c.create_key("bench-p256", "hsm", "ecdsa-p256").unwrap();
    drop(c);

    let mut starts = Vec::new();
    for _ in 0..5 {
        d.stop();
        let t = Instant::now();
        d.start();
        starts.push(t.elapsed());
    }
    starts.sort();
    println!(
        "{:<46} {:>10.1} ms (median of 5, unsealed from swtpm)",
        "keywardd start -> READY=1",
        starts[2].as_secs_f64() * 1e3
    );

    let mut c = Client::connect(d.socket()).unwrap();
    let secs = Duration::from_secs(3);
    rate("GetSecret, 1 client, persistent connection", secs, || {
        c.get_secret("bench/secret", None).unwrap();
    });
    let raw_rate = rate("raw C_Sign ECDSA P-256 (SoftHSM, 1 session)", secs, || {
        raw.sign(&raw_key, SignInput::Message(b"measure")).unwrap();
    });
    let kw_rate = rate(
        "keywardd Sign ECDSA P-256 (SoftHSM), 1 client",
        secs,
        || {
            c.sign("bench-p256", b"measure", false).unwrap();
        },
    );
    println!(
        "{:<46} {:>10.2}",
        "ratio keywardd / raw sign",
        kw_rate / raw_rate
    );

    for total in [1_000usize, 10_000] {
        let have = c.list_secrets(Some("fill/")).unwrap().len();
        let t = Instant::now();
        for i in have..total {
            c.put_secret(&format!("fill/{i}"), b"0123456789abcdef")
                .unwrap();
        }
        let fill = t.elapsed();
        let mut times: Vec<Duration> = (0..5)
            .map(|_| {
                let t = Instant::now();
                c.rekey(None).unwrap();
                t.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "{:<46} {:>10.1} ms (median of 5; filling took {:.1} s)",
            format!("rekey with {total} secrets"),
            times[2].as_secs_f64() * 1e3,
            fill.as_secs_f64()
        );
    }
    let t = Instant::now();
    for i in 0..10_000 {
        assert_eq!(
            c.get_secret(&format!("fill/{i}"), None)
                .unwrap()
                .value
                .expose(),
            b"0123456789abcdef"
        );
    }
    println!(
        "all 10000 secrets read back after 10 rekeys in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}
