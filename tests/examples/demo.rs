//! The README demo: on a private SoftHSM token and a private swtpm, seal and unseal a vault
//! master key in each device, sign inside each device, and verify every signature with openssl.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hsm_shim::pkcs11::Pkcs11Device;
use hsm_shim::tpm::{TpmConfig, TpmDevice};
use hsm_shim::{Backend, KeyAlgorithm, KeySpec, SealPolicy, SecretBytes, SignInput};
use keyward_tests::openssl;
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;

fn show(device: &str, what: &str, detail: impl std::fmt::Display) {
    println!("  [{device:>7}] {what:<34} {detail}");
}

fn exercise(name: &str, dev: &mut dyn Backend, algorithms: &[KeyAlgorithm]) {
    let info = dev.info().clone();
    show(
        name,
        "device",
        format!("{} {} ({})", info.manufacturer, info.model, info.label),
    );

    // A fresh 256-bit master key, sealed by the device and unsealed again.
    let mut vmk = vec![0u8; 32];
    getrandom(&mut vmk);
    let fingerprint = fingerprint(&vmk);
    let vmk = SecretBytes::new(vmk);
    let blob = dev
        .seal(&vmk, b"demo vault/slot 0", &SealPolicy::default())
        .unwrap();
    let stored = serde_json::to_vec(&blob).unwrap();
    show(
        name,
        "sealed the master key",
        format!("{} bytes of blob to store", stored.len()),
    );
    let back = dev.unseal(&blob, b"demo vault/slot 0", None).unwrap();
    assert_eq!(back.expose(), vmk.expose());
    show(
        name,
        "unsealed it inside the device",
        format!("fingerprint {fingerprint} matches"),
    );

    for &algorithm in algorithms {
        let key = dev
            .generate(&KeySpec {
                label: format!("demo-{algorithm}"),
                algorithm,
            })
            .unwrap();
        let public = dev.public_key(&key).unwrap();
        let protection = dev.protection(&key).unwrap();
        assert!(!protection.extractable && protection.sensitive);
        let message = b"Keyward demo: signed inside the device";
        let sig = dev.sign(&key, SignInput::Message(message)).unwrap();
        openssl::verify(&public, algorithm, message, &sig).unwrap();
        show(
            name,
            &format!("{algorithm} key, non-extractable"),
            format!("{}-byte signature, openssl: Verified OK", sig.len()),
        );
    }
}

/// Short, non-secret fingerprint of a key so the demo can show the round trip.
fn fingerprint(key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key)[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

fn main() {
    println!("Keyward device demo (private SoftHSM token + private swtpm, in temp dirs)\n");

    let token = SoftHsm::new("keyward-demo");
    // Single-threaded here, before the module is loaded: the one moment setting it is sound.
    std::env::set_var("SOFTHSM2_CONF", token.conf());
    let mut hsm = Pkcs11Device::open(token.config()).unwrap();
    exercise("softhsm", &mut hsm, &KeyAlgorithm::ALL);

    println!();
    let tpm = Swtpm::start();
    let mut dev = TpmDevice::open(TpmConfig::new(tpm.tcti().parse().unwrap())).unwrap();
    exercise("swtpm", &mut dev, &[KeyAlgorithm::EcdsaP256]);

    println!("\nAll seals round-tripped and every signature verified with openssl.");
}
