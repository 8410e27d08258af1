//! `keyward key attest` (asks the daemon) and `keyward key verify-attestation` (offline: the
//! document is a file, checked by `keyward_proto::attestation` with no daemon involved).
//!
//! Must not: call a document good unless the verifier said so, or hide which checks it could
//! not make (an unpinned signer, no nonce given).

use std::fmt::Write as _;
use std::path::Path;

use keyward::api::{methods, AttestKeyParams, Bytes, KeyName};
use keyward::attestation::{self, Attestation, Format, Verified};
use keyward::Client;
use serde_json::json;

use super::commands::Out;
use super::CliError;

/// Largest attestation document read (a TPM's, with a few EK certificates, is a few KiB).
const MAX_DOCUMENT: usize = 256 * 1024;

/// A `--nonce`: its bytes (a type of its own, so clap takes it as one value, not a list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nonce(pub Vec<u8>);

/// `--nonce HEX`.
pub fn parse_nonce(s: &str) -> Result<Nonce, String> {
    let bytes = base16ct::mixed::decode_vec(s.trim())
        .map_err(|_| format!("{s:?} is not hex (two digits a byte)"))?;
    if bytes.is_empty() || bytes.len() > attestation::MAX_NONCE {
        return Err(format!(
            "a nonce is 1 to {} bytes, not {}",
            attestation::MAX_NONCE,
            bytes.len()
        ));
    }
    Ok(Nonce(bytes))
}

/// `keyward key attest NAME [--nonce HEX] [--output FILE]`.
pub fn attest(
    c: &mut Client,
    out: &Out,
    name: KeyName,
    nonce: Option<Nonce>,
    output: Option<&Path>,
) -> Result<(), CliError> {
    let doc = c
        .request::<methods::AttestKey>(&AttestKeyParams {
            name,
            nonce: nonce.map(|n| Bytes(n.0)),
        })?
        .attestation;
    let mut text = serde_json::to_string_pretty(&doc)
        .map_err(|e| CliError::Local(format!("cannot encode the attestation: {e}")))?;
    text.push('\n');
    match output {
        Some(path) => {
            super::input::write_public(path, text.as_bytes())?;
            out.emit(
                &json!({ "written": path, "format": doc.format, "key": doc.key,
                         "nonce": keyward::text::hex(&doc.nonce.0),
                         "signer_pem": keyward::text::public_key_pem(&doc.signer_public_key.0),
                         "ek_certificates": doc.ek_certificates.len() }),
                || summary(&doc, path),
            )
        }
        // The document itself is the output, `--json` or not.
        None => out.emit(&doc, || text.clone()),
    }
}

/// What `attest --output` tells a person: where the document went and who signed it.
fn summary(doc: &Attestation, path: &Path) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "attestation of key {} ({}, {} on {}) written to {}",
        doc.key,
        doc.format,
        doc.algorithm,
        doc.device,
        path.display()
    );
    let _ = writeln!(s, "nonce: {}", keyward::text::hex(&doc.nonce.0));
    let signer = match doc.format {
        Format::Tpm2Certify => "the TPM's attestation key",
        Format::Pkcs11Attributes => "the vault's audit key",
    };
    let _ = write!(
        s,
        "signed by {signer}:\n{}",
        keyward::text::public_key_pem(&doc.signer_public_key.0)
    );
    if doc.format == Format::Tpm2Certify {
        if doc.ek_certificates.is_empty() {
            let _ = writeln!(s, "EK certificates: none in this TPM");
        }
        for cert in &doc.ek_certificates {
            let _ = write!(s, "EK certificate:\n{}", certificate_pem(&cert.0));
        }
    }
    let _ = writeln!(s, "note: {}", doc.note);
    s
}

fn certificate_pem(der: &[u8]) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap_or_default()
}

/// A public key given as a file (PEM or DER) or as base64 DER text, as DER.
fn read_key(given: &str, option: &str) -> Result<Vec<u8>, CliError> {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    let path = Path::new(given);
    if path.is_file() {
        let bytes = std::fs::read(path)
            .map_err(|e| CliError::Local(format!("cannot read {given}: {e}")))?;
        if bytes.starts_with(b"-----BEGIN") {
            let (_, der) = der::pem::decode_vec(&bytes)
                .map_err(|e| CliError::Usage(format!("{option} {given}: not PEM: {e}")))?;
            return Ok(der);
        }
        return Ok(bytes);
    }
    B64.decode(given.trim()).map_err(|_| {
        CliError::Usage(format!(
            "{option}: neither a file nor base64 DER SubjectPublicKeyInfo"
        ))
    })
}

/// `keyward key verify-attestation FILE [--nonce HEX] [--signer KEY|FILE] [--public-key KEY|FILE]`.
pub fn verify(
    out: &Out,
    file: &Path,
    nonce: Option<&[u8]>,
    signer: Option<&str>,
    public_key: Option<&str>,
) -> Result<(), CliError> {
    let bytes = super::input::read_file(file, MAX_DOCUMENT, "the attestation")?;
    let doc: Attestation = serde_json::from_slice(&bytes).map_err(|e| {
        CliError::Usage(format!(
            "{} is not an attestation document: {e}",
            file.display()
        ))
    })?;
    let signer = signer.map(|s| read_key(s, "--signer")).transpose()?;
    let public_key = public_key
        .map(|k| read_key(k, "--public-key"))
        .transpose()?;
    let verified = attestation::verify(&doc, nonce, signer.as_deref(), public_key.as_deref())
        .map_err(|failure| CliError::AttestationInvalid {
            path: file.to_path_buf(),
            failure,
        })?;
    out.emit(&json!({ "ok": true, "verified": verified }), || {
        verdict(&verified, &doc)
    })
}

fn verdict(v: &Verified, doc: &Attestation) -> String {
    let mut s = String::new();
    let what = if v.hardware {
        "the TPM certifies it holds the key, made inside it (fixedTPM, fixedParent, \
         sensitiveDataOrigin), signed by its attestation key"
    } else {
        "the token reports the key as made on it and never extractable or readable \
         (CKA_LOCAL, CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE), signed by the vault's \
         audit key; this is not a hardware attestation"
    };
    let _ = writeln!(s, "OK: key {} ({}): {what}", v.key, v.algorithm);
    let _ = writeln!(
        s,
        "signer: {}",
        if v.signer_pinned {
            "the key given with --signer".to_owned()
        } else {
            format!(
                "NOT PINNED: the document is consistent, but only --signer (a key you trust) \
                 makes it evidence; its signer is\n{}",
                keyward::text::public_key_pem(&doc.signer_public_key.0)
            )
        }
    );
    let _ = writeln!(
        s,
        "nonce:  {}",
        if v.nonce_checked {
            "matches --nonce"
        } else {
            "NOT CHECKED (no --nonce): the document may be a replay"
        }
    );
    s
}
