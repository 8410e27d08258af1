//! Text forms of bytes that more than one side writes or reads: lower-case hex (audit chain
//! hashes, ids in messages) and PEM public keys (`audit.pub`, `keyward key public`). One
//! implementation each, from the RustCrypto encoders, so that the forms cannot drift apart.

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    base16ct::lower::encode_string(bytes)
}

/// A DER SubjectPublicKeyInfo as PEM (`PUBLIC KEY`, base64 in 64-column lines).
pub fn public_key_pem(der: &[u8]) -> String {
    // Only a length overflow fails, which a public key can't reach.
    pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, der).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn pem_has_64_character_lines_and_the_right_armour() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = public_key_pem(&der);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN PUBLIC KEY-----"));
        assert_eq!(lines.last(), Some(&"-----END PUBLIC KEY-----"));
        let body = &lines[1..lines.len() - 1];
        assert!(body[..body.len() - 1].iter().all(|l| l.len() == 64));
        assert!(body.last().unwrap().len() <= 64);
        assert_eq!(B64.decode(body.concat()).unwrap(), der);
        assert!(pem.ends_with("-----\n"));
        // Exactly 48 bytes: one full line, no empty line after it.
        let pem = public_key_pem(&[1u8; 48]);
        assert_eq!(pem.lines().count(), 3);
    }
}
