//! `keyward-bench`: every Keyward path measured next to its physical limit, in one run, on the
//! same machine.
//!
//! It starts its own world — two swtpm processes, two SoftHSM tokens and a release `keywardd`
//! (the workspace's own binary, next to this one) — and measures, for each path, a bare
//! baseline ([`raw`]) and the daemon back to back, in alternating slices ([`measure`]). Every
//! figure is printed as a ratio to its baseline with its target, because the machine is shared
//! and noisy and an absolute number alone says little. The scale phase fills the vault to a
//! hundred thousand secrets through the API ([`fill`]) and compares the daemon with itself at
//! a thousand. [`phases`] has
//! one function per path, [`world`] the processes and the vault they run against, [`report`]
//! the tables.
//!
//! [`soak`] loads the daemon with 256 clients at once and, with `--soak`, with 32 for minutes
//! while its memory and descriptors are sampled; [`peers`], with `--peers`, measures Parsec,
//! clevis and systemd-creds doing the same jobs.
//!
//! `--quick` runs every path briefly on small vaults: a smoke test that each path works, not a
//! measurement (neither the peers nor the soak). `scripts/bench` builds the release binaries
//! and runs this.

mod fill;
mod fleet;
mod measure;
mod peers;
mod phases;
mod raw;
mod report;
mod soak;
mod world;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};

use measure::{rss, Plan};
use report::Report;
use world::World;

/// Measure every Keyward path against its physical limit on this machine.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Smoke test: every path once, briefly, on vaults of 1k and 10k secrets. It checks that each
    /// path works, not how fast.
    #[arg(long)]
    quick: bool,
    /// Seconds each side of each comparison is measured, in alternating slices.
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,
    /// Secrets in the large vault of the scale phase.
    #[arg(long, value_name = "N")]
    secrets: Option<u64>,
    /// Only these phases (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PHASE")]
    only: Vec<Phase>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Scheduling priority (nice value) for this run and everything it starts; 0 leaves it
    /// alone. Raising it (root only) keeps other work on a shared machine from landing on one
    /// side of a comparison more than the other.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true, value_name = "N")]
    nice: i32,
    /// Exit with status 1 when a figure misses its target.
    #[arg(long)]
    strict: bool,
    /// Also measure the peers (Parsec, clevis, systemd-creds) in this run: figures for
    /// information. `scripts/bench --peers` installs them first.
    #[arg(long)]
    peers: bool,
    /// Also run the soak: 32 clients for MINUTES (default 10), the daemon's RSS and open fds
    /// sampled every 10 s (target/soak/soak.{csv,json,png}); both must stay flat within 10%.
    #[arg(long, value_name = "MINUTES", num_args = 0..=1, default_missing_value = "10")]
    soak: Option<f64>,
    /// Serve the echo baseline on this socket, in this process, until killed (the benchmark
    /// starts itself so, as a process of its own like keywardd).
    #[arg(long, hide = true, value_name = "SOCKET")]
    echo_server: Option<PathBuf>,
}

/// The parts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    /// GetSecret over Varlink vs a NUL-framed JSON echo server.
    GetSecret,
    /// Sign in SoftHSM vs a cryptoki C_Sign loop.
    Sign,
    /// Sign in swtpm vs a tss-esapi sign loop.
    Tpm,
    /// Ed25519 SIGN_REQUEST on the ssh-agent socket vs a cryptoki C_Sign loop.
    SshAgent,
    /// 500 concurrent credential fetches vs accept + write.
    Credentials,
    /// Durable PutSecret vs single-row SQLite commits.
    Put,
    /// Start-up to READY=1 vs the raw TPM unseal path.
    Startup,
    /// 1k vs 100k secrets.
    Scale,
    /// Transit Encrypt/Decrypt vs GetSecret over Varlink.
    Transit,
    /// Start-up to READY=1 unsealed by a signed PCR 11 policy vs by literal PCRs.
    SignedPcr,
    /// 256 concurrent clients: GetSecret and Sign, with the daemon's RSS.
    Wide,
    /// Parsec, clevis and systemd-creds next to Keyward (with --peers; opt-in).
    Peers,
    /// 32 clients for minutes, RSS and fds sampled (with --soak; opt-in).
    Soak,
    /// Sync of 1,000 secrets from OpenBao vs the same reads by a plain HTTPS client.
    UpstreamSync,
    /// Transit Encrypt/Decrypt over Varlink vs the vault's AEAD in process.
    TransitAead,
}

impl Phase {
    /// Whether a run without `--only` includes it: the peers and the soak are asked for.
    fn by_default(self) -> bool {
        !matches!(self, Phase::Peers | Phase::Soak)
    }
}

/// One part of a run: measures against the world and adds to the report.
type PhaseFn = fn(&mut World, &Settings, &mut Report) -> Result<()>;

/// How long and how large, full or quick.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub plan: Plan,
    /// Timed start-ups (and raw unseals) per figure.
    pub restarts: usize,
    /// Timed rekeys per vault size.
    pub rekeys: usize,
    pub small: u64,
    pub large: u64,
    /// Concurrent credential fetches per burst.
    pub fetchers: usize,
    /// How long the soak runs.
    pub soak: Duration,
}

impl Settings {
    fn from(args: &Args) -> Self {
        let seconds = args.seconds.unwrap_or(if args.quick { 0.2 } else { 4.0 });
        // Many short alternating slices: a burst of load from another process on this shared
        // machine then lands on both sides about equally instead of on one whole figure.
        let rounds = if args.quick { 2 } else { 10 };
        Settings {
            plan: Plan {
                warmup: Duration::from_secs_f64((seconds / 6.0).clamp(0.02, 0.5)),
                slice: Duration::from_secs_f64(seconds / rounds as f64),
                rounds,
            },
            restarts: if args.quick { 2 } else { 7 },
            rekeys: if args.quick { 2 } else { 7 },
            small: 1_000,
            large: args
                .secrets
                // Filled through the API at about 1,300 PutSecret/s here: 100k takes ~80 s
                // (1M would take ~13 min, longer than the rest of the run together).
                .unwrap_or(if args.quick { 10_000 } else { 100_000 }),
            fetchers: 500,
            soak: Duration::from_secs_f64(soak_minutes(args.soak.unwrap_or(10.0)) * 60.0),
        }
    }
}

/// `--soak`'s minutes, within a day (NaN: none).
fn soak_minutes(m: f64) -> f64 {
    if m.is_nan() {
        0.0
    } else {
        m.clamp(0.0, 24.0 * 60.0)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(socket) = &args.echo_server {
        return match raw::servers::serve_echo(socket, world::SECRET) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keyward-bench: echo server: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("keyward-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    let started = Instant::now();
    let settings = Settings::from(args);
    let mut report = Report {
        quick: args.quick,
        ..Report::default()
    };
    // Before any thread or child exists: they all inherit it.
    let priority = renice(args.nice);
    let mut world = World::start()?;
    report.machine = machine(world.kw.keywardd.dir());
    report.machine.push(("priority".into(), priority));
    let plan = settings.plan;
    report.note(format!(
        "method: each rate is {:.1} s per side in {} alternating baseline/keyward slices after a \
         {:.2} s warm-up of each; start-up and rekey are medians of {} and {}",
        (plan.slice * plan.rounds as u32).as_secs_f64(),
        plan.rounds,
        plan.warmup.as_secs_f64(),
        settings.restarts,
        settings.rekeys
    ));
    let wanted = |p: Phase| {
        (if args.only.is_empty() {
            p.by_default()
        } else {
            args.only.contains(&p)
        }) || (p == Phase::Peers && args.peers)
            || (p == Phase::Soak && args.soak.is_some())
    };
    let phases: [(Phase, PhaseFn); 15] = [
        (Phase::GetSecret, phases::get_secret),
        (Phase::Sign, phases::sign_softhsm),
        (Phase::Tpm, phases::sign_tpm),
        (Phase::SshAgent, phases::sign_ssh_agent),
        (Phase::Credentials, phases::credential_fetches),
        (Phase::Put, phases::put_secret),
        (Phase::Startup, phases::startup),
        (Phase::Transit, phases::transit),
        (Phase::Scale, phases::scale),
        (Phase::SignedPcr, phases::signed_startup),
        (Phase::Wide, soak::wide),
        (Phase::Peers, peers::peers),
        (Phase::Soak, soak::soak),
        (Phase::UpstreamSync, fleet::upstream_sync),
        (Phase::TransitAead, fleet::transit_aead),
    ];
    for (phase, f) in phases {
        if wanted(phase) {
            eprintln!("== {phase:?}");
            f(&mut world, &settings, &mut report).with_context(|| format!("{phase:?}"))?;
            world.kw.track_rss()?;
        }
    }
    let own = rss(std::process::id())?.0;
    report.note(format!(
        "peak RSS: keywardd {:.1} MiB (highest VmHWM over the run), this benchmark {:.1} MiB",
        world.kw.peak_rss as f64 / 1048576.0,
        own as f64 / 1048576.0
    ));
    report.note(format!(
        "whole run {:.0} s{}",
        started.elapsed().as_secs_f64(),
        if args.quick {
            " (--quick: a smoke test, the figures mean nothing)"
        } else {
            ""
        }
    ));
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    let missed = report.missed();
    // A --quick run's figures mean nothing: their misses are in the report, not worth a line.
    for r in missed.iter().filter(|_| args.strict || !args.quick) {
        eprintln!(
            "keyward-bench: MISS {} ({}): {:.2}, target {}",
            r.path,
            r.measure,
            r.ratio,
            r.goal.text()
        );
    }
    Ok(!args.strict || missed.is_empty())
}

/// Set this process's nice value to `n`, for this thread and every thread and child started
/// later (Linux priorities are per thread and inherited). Returns what the run ran at.
///
/// Why: on a loaded machine a path spread over several threads (client, runtime, device
/// actor) gets more CPU shares than a one-thread baseline, which biases ratios towards
/// Keyward; at a raised priority both sides run as on a quiet machine.
fn renice(n: i32) -> String {
    if n == 0 {
        return "nice 0 (left alone)".into();
    }
    let pid = std::process::id().to_string();
    match Command::new("renice")
        .args(["-n", &n.to_string(), "-p", &pid])
        .output()
    {
        Ok(o) if o.status.success() => {
            format!("nice {n} (this benchmark, keywardd, swtpm: inherited)")
        }
        Ok(o) => format!(
            "nice 0 (renice refused: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("nice 0 (no renice: {e})"),
    }
}

/// CPU, cores, kernel and the filesystem the daemon's state (and the SQLite baseline) is on.
fn machine(state: &Path) -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib as f64 / 1048576.0),
        );
    let fs = Command::new("findmnt")
        .args(["-no", "FSTYPE,SOURCE", "-T"])
        .arg(state)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    vec![
        ("CPU".into(), format!("{cpu} ({cores} cores available)")),
        ("memory".into(), memory),
        ("kernel".into(), kernel),
        (
            "filesystem of the state dir".into(),
            format!("{fs} ({})", state.display()),
        ),
    ]
}
