//! PKCS#11 URIs (RFC 7512). Placeholder until the parser lands.
