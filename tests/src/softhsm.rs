//! SoftHSM fixture (placeholder).
