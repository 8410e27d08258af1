//! PKCS#11 backend (cryptoki).
