//! `keyward`, the admin command line.

fn main() -> std::process::ExitCode {
    eprintln!(
        "keyward {}: the command line is not built yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::FAILURE
}
