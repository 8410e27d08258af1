//! `keywardd` entry point.

fn main() -> std::process::ExitCode {
    eprintln!(
        "keywardd {}: the daemon is not built yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::FAILURE
}
