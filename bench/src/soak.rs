//! Load beyond one socket's usual share: 256 concurrent clients ([`wide`]: GetSecret against the
//! echo server, Sign against `C_Sign` on as many sessions, and the daemon's resident set under
//! that load), and the soak ([`soak`], `--soak [MINUTES]`, opt-in): 32 clients for minutes while
//! the daemon's `VmRSS` and open file descriptors are sampled every 10 s, the samples written as
//! CSV and JSON and drawn as a PNG (plotters), with "flat within 10%" as the soak's target.
//!
//! The 256-client figures are for information: no target speaks of them. The daemon serves
//! them because the benchmark's daemon allows 320 connections, 300 of them to one uid (root,
//! here), and queues up to 512 device calls (see `world::LIMITS`); the defaults (256, 64 per
//! uid, a device queue of 64) would answer most of them `Busy`.
//!
//! Must not: sleep (the sampler waits on its stop channel with a timeout: the period is the
//! measurement, and the end of the load wakes it at once), or let a failed request pass.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use keyward::Client;
use serde::Serialize;

use crate::measure::{compare, rss, run_clients};
use crate::raw;
use crate::raw::pkcs11::{Alg, RawSigner};
use crate::report::{Goal, Report, Unit};
use crate::world::{clients_label, connect, World, SECRET, SIGN_DATA};
use crate::Settings;

/// Concurrent clients of the wide phase.
pub const WIDE: usize = 256;
/// Concurrent clients of the soak, of which [`SOAK_SIGNERS`] sign and the rest read secrets.
pub const SOAK_CLIENTS: usize = 32;
/// The soak's signing clients (ECDSA P-256 in SoftHSM).
pub const SOAK_SIGNERS: usize = 4;
/// How often the soak samples the daemon.
pub const SOAK_PERIOD: Duration = Duration::from_secs(10);
/// The soak's target: no later sample above the first under load by more than this.
pub const FLAT: f64 = 1.10;

/// GetSecret, checking the value.
fn get(c: &mut Client) -> Result<()> {
    let reply = c.get_secret("bench/secret", None)?;
    ensure!(
        reply.value.expose() == SECRET,
        "GetSecret returned another value"
    );
    Ok(())
}

/// Sign with the daemon's P-256 key in SoftHSM.
fn sign(c: &mut Client) -> Result<()> {
    c.sign("p256-hsm", SIGN_DATA, false)?;
    Ok(())
}

/// 256 clients at once: GetSecret vs the echo server, Sign ECDSA P-256 vs `C_Sign` on 256
/// sessions, then the daemon's `VmRSS` under that load vs before it.
pub fn wide(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let pid = w.kw.keywardd.pid();
    let idle = rss(pid)?.1;
    let sampler = Sampler::start(pid, Duration::from_millis(100));
    let echo = w.scratch.path().join("echo-wide.sock");
    let _server = raw::servers::EchoProcess::start(&echo)?;
    let path = format!("GetSecret over Varlink, {}", clients_label(WIDE));
    {
        let mut base = connect(&echo, WIDE)?;
        let mut kw = w.kw.clients(WIDE)?;
        let c = compare(
            s.plan,
            |d| run_clients(&mut base, d, get),
            |d| run_clients(&mut kw, d, get),
        )?;
        let info = (Goal::Info, Goal::Info);
        r.rate_and_p99(&path, "NUL-framed JSON echo", "echo", c, info);
    }
    let path = format!("Sign ECDSA P-256 in SoftHSM, {}", clients_label(WIDE));
    {
        let mut base = (0..WIDE)
            .map(|_| w.raw.signer(Alg::EcdsaP256))
            .collect::<Result<Vec<RawSigner>>>()?;
        let mut kw = w.kw.clients(WIDE)?;
        let c = compare(
            s.plan,
            |d| {
                run_clients(&mut base, d, |x: &mut RawSigner| {
                    x.sign(SIGN_DATA).map(drop)
                })
            },
            |d| run_clients(&mut kw, d, sign),
        )?;
        let raw_name = format!("cryptoki C_Sign, {WIDE} sessions");
        r.rate_and_p99(&path, &raw_name, "C_Sign", c, (Goal::Info, Goal::Info));
    }
    let samples = sampler.stop()?;
    let peak = samples.iter().map(|x| x.rss).max().unwrap_or(idle);
    r.row(
        &format!("keywardd RSS under {WIDE} clients (GetSecret, then Sign)"),
        "VmRSS, highest sample",
        "keywardd VmRSS before",
        Unit::Bytes,
        (idle as f64, peak as f64),
        &[],
        Goal::Info,
    );
    Ok(())
}

/// One sample of the daemon: when, its resident set, its open descriptors, requests done.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// Seconds since the load started.
    pub t: f64,
    /// `VmRSS`, bytes.
    pub rss: u64,
    /// Entries of `/proc/PID/fd`.
    pub fds: u64,
    /// Requests completed since the load started.
    pub ops: u64,
}

/// The number of open file descriptors of `pid`.
fn fd_count(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count() as u64)
}

/// A thread that samples a process every `period` until stopped (at once: it waits on the
/// stop channel, not on a timer).
#[derive(Debug)]
struct Sampler {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Result<Vec<Point>>>,
}

impl Sampler {
    fn start(pid: u32, period: Duration) -> Sampler {
        Self::start_counting(pid, period, None)
    }

    /// Also record `ops` (a counter the load increments) with each sample.
    fn start_counting(
        pid: u32,
        period: Duration,
        ops: Option<std::sync::Arc<AtomicU64>>,
    ) -> Sampler {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || -> Result<Vec<Point>> {
            let start = Instant::now();
            let mut points = Vec::new();
            let mut next = start;
            loop {
                points.push(Point {
                    t: start.elapsed().as_secs_f64(),
                    rss: rss(pid)?.1,
                    fds: fd_count(pid)?,
                    ops: ops.as_ref().map_or(0, |o| o.load(Ordering::Relaxed)),
                });
                next += period;
                match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(points),
                }
            }
        });
        Sampler { stop, thread }
    }

    /// Stop and return the samples.
    fn stop(self) -> Result<Vec<Point>> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| anyhow!("the sampler thread panicked"))?
    }
}

/// `SOAK_CLIENTS` clients (`SOAK_SIGNERS` of them signing, the rest reading a secret) for
/// `s.soak`, the daemon sampled every [`SOAK_PERIOD`]: the samples go to target/soak/ as
/// soak.csv, soak.json and soak.png; the rows say whether `VmRSS` and the descriptor count
/// stayed within [`FLAT`] of the first sample under load.
pub fn soak(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let pid = w.kw.keywardd.pid();
    let ops = std::sync::Arc::new(AtomicU64::new(0));
    let mut clients: Vec<(Client, bool)> =
        w.kw.clients(SOAK_CLIENTS)?
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, i < SOAK_SIGNERS))
            .collect();
    let counted = std::sync::Arc::clone(&ops);
    let sampler = Sampler::start_counting(pid, SOAK_PERIOD, Some(std::sync::Arc::clone(&ops)));
    let load = run_clients(&mut clients, s.soak, |(c, signs): &mut (Client, bool)| {
        if *signs {
            sign(c)?;
        } else {
            get(c)?;
        }
        counted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    let mut points = sampler.stop()?;
    let load = load?;
    // The last sample, at the end of the load, unless one was just taken.
    let end = Point {
        t: load.wall.as_secs_f64(),
        rss: rss(pid)?.1,
        fds: fd_count(pid)?,
        ops: ops.load(Ordering::Relaxed),
    };
    if points.last().is_none_or(|p| end.t - p.t > 1.0) {
        points.push(end);
    }
    let minutes = s.soak.as_secs_f64() / 60.0;
    let length = if minutes.fract() == 0.0 {
        format!("{minutes:.0} min")
    } else {
        format!("{minutes:.1} min")
    };
    let dir = soak_dir()?;
    std::fs::create_dir_all(&dir)?;
    write_samples(&dir, &points)?;
    let plotted = plot(&dir.join("soak.png"), &points, minutes, &length);
    // The first sample is taken as the load starts; the one a period later, under load, is
    // the reference every later one is held to.
    let (first, later) = match points.get(1..) {
        Some([first, later @ ..]) if !later.is_empty() => (*first, later),
        _ => {
            r.note(format!(
                "soak: {length} gave fewer than three samples {} s apart: no figure",
                SOAK_PERIOD.as_secs()
            ));
            return Ok(());
        }
    };
    let path = format!(
        "soak, {SOAK_CLIENTS} clients ({} GetSecret, {SOAK_SIGNERS} Sign), {length}",
        SOAK_CLIENTS - SOAK_SIGNERS
    );
    let highest = |f: fn(&Point) -> u64| later.iter().map(f).max().unwrap_or(0) as f64;
    r.row(
        &format!("{path}: keywardd VmRSS"),
        "highest later sample",
        &format!("the sample at {:.0} s", first.t),
        Unit::Bytes,
        (first.rss as f64, highest(|p| p.rss)),
        &[],
        Goal::AtMost(FLAT),
    );
    r.row(
        &format!("{path}: keywardd open fds"),
        "highest later sample",
        &format!("the sample at {:.0} s", first.t),
        Unit::Count,
        (first.fds as f64, highest(|p| p.fds)),
        &[],
        Goal::AtMost(FLAT),
    );
    let rate = |a: &Point, b: &Point| (b.ops - a.ops) as f64 / (b.t - a.t).max(1e-9);
    if let [.., before, last] = points.as_slice() {
        r.row(
            &format!("{path}: throughput"),
            "last interval",
            "the first interval",
            Unit::PerSec,
            (rate(&points[0], &points[1]), rate(before, last)),
            &[],
            Goal::Info,
        );
    }
    let stats = load.stats();
    r.note(format!(
        "soak: {} requests in {:.0} s ({:.0}/s), p50 {}, p99 {}, p99.9 {}; {} samples in {}{}",
        stats.n,
        end.t,
        stats.rate,
        crate::report::secs(stats.p50),
        crate::report::secs(stats.p99),
        crate::report::secs(stats.p999),
        points.len(),
        dir.display(),
        match plotted {
            Ok(()) => " (soak.csv, soak.json, soak.png)".to_owned(),
            Err(e) => format!(" (soak.csv, soak.json; no plot: {e:#})"),
        }
    ));
    Ok(())
}

/// target/soak, next to the target/<profile> directory this binary runs from.
fn soak_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(|t| t.join("soak"))
        .ok_or_else(|| anyhow!("{} has no target directory", exe.display()))
}

/// soak.csv (`t_s,rss_bytes,fds,ops`) and soak.json (the same points).
fn write_samples(dir: &Path, points: &[Point]) -> Result<()> {
    let mut csv = String::from("t_s,rss_bytes,fds,ops\n");
    for p in points {
        csv.push_str(&format!("{:.1},{},{},{}\n", p.t, p.rss, p.fds, p.ops));
    }
    std::fs::write(dir.join("soak.csv"), csv)?;
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(points)?)?;
    Ok(())
}

/// The TrueType font the plot's text is set in (Debian's fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One line of the soak's plot.
struct Series {
    label: &'static str,
    value: fn(&Point) -> f64,
    colour: plotters::style::RGBColor,
}

/// Two stacked line charts over the soak's minutes: `VmRSS` (MiB) and open descriptors, each
/// with the ±10% band around the first sample under load.
fn plot(path: &Path, points: &[Point], minutes: f64, length: &str) -> Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read(FONT).with_context(|| format!("reading the font {FONT}"))?;
    // plotters keeps registered fonts for the life of the process; this runs once per run.
    plotters::style::register_font("sans-serif", FontStyle::Normal, font.leak())
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let root = BitMapBackend::new(path, (800, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(280);
    let x_end = (points.last().map_or(0.0, |p| p.t) / 60.0).max(minutes);
    let series = [
        Series {
            label: "keywardd VmRSS (MiB)",
            value: |p| p.rss as f64 / 1048576.0,
            colour: BLUE,
        },
        Series {
            label: "keywardd open fds",
            value: |p| p.fds as f64,
            colour: RED,
        },
    ];
    for (
        area,
        Series {
            label,
            value,
            colour,
        },
    ) in [&top, &bottom].into_iter().zip(series)
    {
        let reference = points.get(1).or(points.first()).map_or(0.0, value);
        let highest = points.iter().map(value).fold(reference * FLAT, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{label}, {SOAK_CLIENTS} clients, {length}"),
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_end, 0.0..highest * 1.05)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            // No fine grid: the picture is about one line and its band.
            .light_line_style(TRANSPARENT)
            .x_desc("minutes")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for bound in [reference * (2.0 - FLAT), reference * FLAT] {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, bound), (x_end, bound)],
                    colour.mix(0.4),
                ))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.t / 60.0, value(p))),
                colour.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
