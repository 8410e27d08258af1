//! Varlink transport (being written).
