//! Device actors (being written).
