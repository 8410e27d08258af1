//! swtpm fixture (placeholder).
