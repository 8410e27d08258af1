//! Verify signatures with the `openssl` command line: an implementation we did not write, reading
//! the encodings (SPKI PEM, DER ECDSA, raw Ed25519, raw RSA-PSS and PKCS#1 v1.5) that users' tools will read.

use std::process::Command;

use hsm_shim::{KeyAlgorithm, PublicKeyDer};
use keyward::api::SignHash;

/// Verify `signature` over `message` with the `openssl` CLI. Returns `Err` with openssl's output
/// when it rejects the signature.
pub fn verify(
    public_key: &PublicKeyDer,
    algorithm: KeyAlgorithm,
    message: &[u8],
    signature: &[u8],
) -> anyhow::Result<()> {
    verify_over(public_key, algorithm, SignHash::Sha256, message, signature)
}

/// As [`verify`], for a signature made over `hash` of the message (SHA-512: RSA PKCS#1 v1.5).
pub fn verify_over(
    public_key: &PublicKeyDer,
    algorithm: KeyAlgorithm,
    hash: SignHash,
    message: &[u8],
    signature: &[u8],
) -> anyhow::Result<()> {
    let digest = format!("-{hash}");
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("pub.pem");
    let msg = dir.path().join("msg");
    let sig = dir.path().join("sig");
    std::fs::write(&key, public_key.to_pem())?;
    std::fs::write(&msg, message)?;
    std::fs::write(&sig, signature)?;
    let mut cmd = Command::new("openssl");
    match algorithm {
        KeyAlgorithm::Ed25519 => {
            cmd.args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
                .arg(&key)
                .arg("-in")
                .arg(&msg)
                .arg("-sigfile")
                .arg(&sig);
        }
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::RsaPkcs1_3072 => {
            cmd.args(["dgst", &digest, "-verify"])
                .arg(&key)
                .arg("-signature")
                .arg(&sig)
                .arg(&msg);
        }
        KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPss2048 => {
            cmd.args(["dgst", &digest, "-sigopt", "rsa_padding_mode:pss"])
                .args([
                    "-sigopt",
                    // 32 bytes from tokens and from TPMs alike (libtpms: the digest's size).
                    "rsa_pss_saltlen:32",
                    "-sigopt",
                    "rsa_mgf1_md:sha256",
                ])
                .arg("-verify")
                .arg(&key)
                .arg("-signature")
                .arg(&sig)
                .arg(&msg);
        }
    }
    let out = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success(),
        "openssl rejected the {algorithm} signature: {text}"
    );
    anyhow::ensure!(
        text.contains("Verified"),
        "openssl said neither yes nor no: {text}"
    );
    Ok(())
}

/// Parse a DER SPKI with `openssl pkey` and return its text dump (algorithm name, curve, size).
pub fn describe_public_key(public_key: &PublicKeyDer) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("pub.der");
    std::fs::write(&key, &public_key.0)?;
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-noout", "-text", "-in"])
        .arg(&key)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl cannot read the key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
