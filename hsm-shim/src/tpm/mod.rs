//! TPM 2.0 backend (tss-esapi).
