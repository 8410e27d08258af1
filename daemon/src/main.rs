//! `keywardd`: harden the process, read the command line, start logging and the runtime, hand
//! the config to [`startup`], and turn signals into a policy reload (SIGHUP) or a drained stop
//! (SIGTERM, SIGINT). Everything it starts and serves lives in the library.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keywardd::config::{Config, DEFAULT_CONFIG};
use keywardd::startup::{self, StartError};
use keywardd::sys;
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "Usage: keywardd [--config PATH] [--restore FILE | --doctor [--json]]";

const HELP: &str = "\
The Keyward daemon: a vault master key sealed to a TPM or PKCS#11 token, secrets encrypted
under it, signing inside the devices.

Usage: keywardd [--config PATH] [--restore FILE | --doctor [--json]]

Options:
  --config PATH    The configuration file [default: /etc/keyward/keywardd.toml]
  --restore FILE   Restore the backup FILE (from `keyward backup`) as the config's state
                   directory, which must be empty or absent, then exit. Run it as root
                   before the daemon starts (files in an existing empty directory get
                   its owner)
  --doctor         Check the config, the state directory, PIN files, SoftHSM config,
                   devices, D-Bus policy, sockets, RLIMIT_MEMLOCK and the clock; print
                   ok/warn/fail with the fix for each; exit 1 on any fail (`keyward
                   doctor` runs this)
  --json           With --doctor: one JSON document
  -h, --help     Print this help
  -V, --version  Print the version
";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// Run the daemon on this config file.
    Run { config: PathBuf },
    /// Restore a backup as the config's state directory, offline, and exit.
    Restore { config: PathBuf, file: PathBuf },
    /// Run the checks of `--doctor` on this config and exit.
    Doctor { config: PathBuf, json: bool },
    /// Print the version.
    Version,
    /// Print the help.
    Help,
}

/// Parse the arguments (without the program name). The whole line is checked, so a typo next
/// to `--help` is still reported; anything unknown is an error.
fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut config: Option<PathBuf> = None;
    let mut restore: Option<PathBuf> = None;
    let mut doctor = false;
    let mut json = false;
    let mut answer: Option<Command> = None;
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => {
                let path = PathBuf::from(parser.value()?);
                if config.replace(path).is_some() {
                    return Err("--config is given more than once".into());
                }
            }
            Long("restore") => {
                let path = PathBuf::from(parser.value()?);
                if restore.replace(path).is_some() {
                    return Err("--restore is given more than once".into());
                }
            }
            Long("doctor") => doctor = true,
            Long("json") => json = true,
            Long("help") | Short('h') => {
                answer.get_or_insert(Command::Help);
            }
            Long("version") | Short('V') => {
                answer.get_or_insert(Command::Version);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    let config = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    if let Some(answer) = answer {
        return Ok(answer);
    }
    Ok(match (restore, doctor) {
        (Some(_), true) => return Err("--restore and --doctor don't go together".into()),
        (_, false) if json => return Err("--json goes with --doctor".into()),
        (Some(file), false) => Command::Restore { config, file },
        (None, true) => Command::Doctor { config, json },
        (None, false) => Command::Run { config },
    })
}

fn main() -> ExitCode {
    // Before any secret exists and before any thread starts.
    if let Err(e) = sys::harden() {
        eprintln!("keywardd: cannot harden the process: {e}");
        return ExitCode::FAILURE;
    }
    let config_path = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run { config }) => config,
        Ok(Command::Restore { config, file }) => return restore(&config, &file),
        Ok(Command::Doctor { config, json }) => return doctor(&config, json),
        Ok(Command::Version) => {
            println!("keywardd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("keywardd: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    keywardd::logging::init();
    match run(&config_path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            sys::notify(&[NotifyState::Status(&format!("failed: {e}"))]);
            ExitCode::FAILURE
        }
    }
}

/// `--restore`: offline, before the daemon starts, so it needs no runtime and no device; it
/// reads the state directory and the audit options from the same config the daemon will.
fn restore(config_path: &Path, file: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keywardd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match keywardd::backup::restore(file, &config.state_dir, config.audit) {
        Ok(m) => {
            println!(
                "restored {} into {}: taken {} by keywardd {}, schema {}; audit log head then: {}",
                file.display(),
                config.state_dir.display(),
                m.created,
                m.keyward_version,
                m.schema_version,
                m.audit_head
                    .map_or("none".into(), |h| format!("seq {} hash {}", h.seq, h.hash)),
            );
            println!(
                "start keywardd, then unseal with recovery shares or a PIN (`keyward unseal`); \
                 a tpm2 keyslot was sealed by the old machine's TPM and can't open here: \
                 `keyward enroll tpm2`, then `keyward keyslot remove` the old one"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keywardd: restore refused: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--doctor`: the checks, printed; exit 1 if any failed.
fn doctor(config_path: &Path, json: bool) -> ExitCode {
    use keywardd::doctor::{self, Level};
    let findings = doctor::run(config_path);
    let failed = findings.iter().any(|f| f.level == Level::Fail);
    if json {
        let doc = serde_json::json!({ "ok": !failed, "checks": findings });
        println!("{doc:#}");
    } else {
        print!("{}", doctor::text(&findings));
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The config is read and the process prepared while it is still single-threaded; then the
/// runtime starts.
fn run(config_path: &Path) -> Result<(), StartError> {
    let config = Config::load(config_path)?;
    startup::prepare_process(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    runtime.block_on(serve(&config, config_path))
}

async fn serve(config: &Config, config_path: &Path) -> Result<(), StartError> {
    // Handlers first: a SIGTERM that lands during start-up (or right after READY=1) must drain,
    // not kill with the default action.
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
    let daemon = startup::start(config).await?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match daemon.reload_policy(config_path).await {
                Ok(()) => tracing::info!("policy reloaded"),
                Err(e) => tracing::error!("policy reload rejected, keeping the old policy: {e}"),
            },
        }
    }
    daemon.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(OsString::from)).map_err(|e| e.to_string())
    }

    #[test]
    fn the_config_path_is_taken_both_ways() {
        let run = |p: &str| {
            Ok(Command::Run {
                config: PathBuf::from(p),
            })
        };
        assert_eq!(parse(&[]), run(DEFAULT_CONFIG));
        assert_eq!(parse(&["--config", "/x/k.toml"]), run("/x/k.toml"));
        assert_eq!(parse(&["--config=/x/k.toml"]), run("/x/k.toml"));
        // A path that starts like an option is still the value of --config.
        assert_eq!(parse(&["--config", "--odd"]), run("--odd"));
    }

    #[test]
    fn restore_takes_a_file_and_the_config() {
        assert_eq!(
            parse(&["--restore", "/b/k.backup", "--config", "/x/k.toml"]),
            Ok(Command::Restore {
                config: PathBuf::from("/x/k.toml"),
                file: PathBuf::from("/b/k.backup"),
            })
        );
        assert_eq!(
            parse(&["--restore=/b"]),
            Ok(Command::Restore {
                config: PathBuf::from(DEFAULT_CONFIG),
                file: PathBuf::from("/b"),
            })
        );
        let e = parse(&["--restore", "/a", "--restore", "/b"]).unwrap_err();
        assert!(e.contains("more than once"), "{e}");
    }

    #[test]
    fn doctor_takes_json_and_nothing_else_does() {
        assert_eq!(
            parse(&["--doctor", "--json"]),
            Ok(Command::Doctor {
                config: PathBuf::from(DEFAULT_CONFIG),
                json: true,
            })
        );
        assert!(parse(&["--json"]).unwrap_err().contains("--doctor"));
        assert!(parse(&["--doctor", "--restore", "/b"])
            .unwrap_err()
            .contains("together"));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["-h"]), Ok(Command::Help));
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
        assert_eq!(parse(&["-V"]), Ok(Command::Version));
        assert_eq!(
            parse(&["--config", "/x", "--version"]),
            Ok(Command::Version)
        );
    }

    #[test]
    fn anything_else_is_an_error() {
        let e = parse(&["--confg", "/x"]).unwrap_err();
        assert!(e.contains("--confg"), "{e}");
        let e = parse(&["/x/k.toml"]).unwrap_err();
        assert!(e.contains("/x/k.toml"), "{e}");
        let e = parse(&["--config"]).unwrap_err();
        assert!(e.contains("--config"), "{e}");
        let e = parse(&["--config", "/a", "--config", "/b"]).unwrap_err();
        assert!(e.contains("more than once"), "{e}");
        let e = parse(&["--version=2"]).unwrap_err();
        assert!(e.contains("--version"), "{e}");
        let e = parse(&["--help", "--bogus"]).unwrap_err();
        assert!(e.contains("--bogus"), "{e}");
    }
}
