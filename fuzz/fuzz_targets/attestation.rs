//! The key attestation verifier on any bytes: as a `TPMS_ATTEST`, as a TPM document whose
//! blobs are cut from the input, and as a JSON document.
//!
//! Checks, beyond "no panic" and bounded reads: nothing made from arbitrary bytes verifies
//! (it would need the attestation key's signature), and what `CertifyInfo::parse` returns lies
//! inside the input.
#![no_main]

use keyward_proto::api::Bytes;
use keyward_proto::attestation::{verify, Attestation, CertifyInfo, Format, TPM_NOTE};
use keyward_proto::kinds::KeyAlgorithm;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = CertifyInfo::parse(data) {
        let total = info.signer_name.len() + info.extra_data.len() + info.name.len();
        assert!(total <= data.len());
    }
    let (a, b) = data.split_at(data.first().map_or(0, |&n| usize::from(n)).min(data.len()));
    let (b, c) = b.split_at(b.len() / 2);
    let doc = Attestation {
        format: Format::Tpm2Certify,
        key: "k".into(),
        device: "tpm".into(),
        algorithm: KeyAlgorithm::EcdsaP256,
        public_key: Bytes(Vec::new()),
        nonce: Bytes(Vec::new()),
        signer_public_key: Bytes(c.to_vec()),
        signature: Bytes(a.to_vec()),
        attest: Some(Bytes(data.to_vec())),
        key_public_area: Some(Bytes(b.to_vec())),
        signer_public_area: Some(Bytes(c.to_vec())),
        ek_certificates: Vec::new(),
        attributes: None,
        note: TPM_NOTE.into(),
    };
    assert!(verify(&doc, None, None, None).is_err());
    if let Ok(doc) = serde_json::from_slice::<Attestation>(data) {
        assert!(verify(&doc, None, None, None).is_err());
    }
});
