//! keywardd: the vault, its store and the transports (Varlink, D-Bus, credential socket).
//! The device layer it builds on is the `hsm-shim` crate.
