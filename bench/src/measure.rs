//! How figures are taken: closed-loop clients on threads for a fixed time, every request timed,
//! and a baseline and a Keyward path measured in alternating slices, so that both see the same
//! machine (it is shared and its load drifts; a ratio of two figures taken minutes apart would
//! measure the drift).
//!
//! Must not: sleep, or mix warm-up requests into a figure.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use keywardd::identity::status_field;

/// Requests counted over a measured wall time, with each request's latency.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Completed requests.
    pub ops: u64,
    /// Wall time the requests ran in (summed over slices).
    pub wall: Duration,
    /// Per-request latency in nanoseconds, unsorted.
    pub lat_ns: Vec<u64>,
}

impl Sample {
    /// Add another slice's requests and time.
    pub fn merge(&mut self, other: Sample) {
        self.ops += other.ops;
        self.wall += other.wall;
        self.lat_ns.extend(other.lat_ns);
    }

    /// Requests per second over the measured wall time.
    pub fn rate(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    /// Rate and latency percentiles.
    pub fn stats(mut self) -> Stats {
        self.lat_ns.sort_unstable();
        Stats {
            rate: self.rate(),
            n: self.lat_ns.len() as u64,
            p50: percentile(&self.lat_ns, 0.50),
            p99: percentile(&self.lat_ns, 0.99),
            p999: percentile(&self.lat_ns, 0.999),
        }
    }
}

/// A summary of a [`Sample`]: rate and latency percentiles in seconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    pub rate: f64,
    pub n: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// The `q` quantile (nearest rank) of sorted nanoseconds, in seconds; 0 for no data.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e9
}

/// The median of a few timings (start-ups, rekeys), in seconds.
pub fn median(times: &[Duration]) -> f64 {
    let mut v: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Time per slice and number of alternating rounds.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Discarded run of each side before the first slice (caches, connections, lazy loads).
    pub warmup: Duration,
    /// One measured slice of one side.
    pub slice: Duration,
    /// Baseline/Keyward slice pairs; each side's figure covers `rounds × slice`.
    pub rounds: usize,
}

/// What [`compare`] measured: each side over all its slices, and the ratio of the two sides'
/// rates (Keyward / baseline) in each round.
#[derive(Debug)]
pub struct Compared {
    pub base: Sample,
    pub keyward: Sample,
    /// One ratio per baseline/Keyward slice pair: their median and spread say more than the
    /// ratio of the totals when another process's load came in bursts.
    pub pairs: Vec<f64>,
    /// The same for the median latency (Keyward / baseline).
    pub p50_pairs: Vec<f64>,
}

/// Measure `base` and `keyward` in alternating slices after a warm-up of each: each closure
/// runs its load for the duration it is given and returns what it measured.
///
/// # Errors
/// The first failure of either side.
pub fn compare(
    plan: Plan,
    mut base: impl FnMut(Duration) -> Result<Sample>,
    mut keyward: impl FnMut(Duration) -> Result<Sample>,
) -> Result<Compared> {
    base(plan.warmup).context("baseline warm-up")?;
    keyward(plan.warmup).context("keyward warm-up")?;
    let mut c = Compared {
        base: Sample::default(),
        keyward: Sample::default(),
        pairs: Vec::new(),
        p50_pairs: Vec::new(),
    };
    for _ in 0..plan.rounds.max(1) {
        let b = base(plan.slice).context("baseline")?;
        let k = keyward(plan.slice).context("keyward")?;
        if b.rate() > 0.0 {
            c.pairs.push(k.rate() / b.rate());
        }
        let (b50, k50) = (b.clone().stats().p50, k.clone().stats().p50);
        if b50 > 0.0 {
            c.p50_pairs.push(k50 / b50);
        }
        c.base.merge(b);
        c.keyward.merge(k);
    }
    Ok(c)
}

/// The `q` quantile of some values, interpolated between the nearest ranks (so the 0.5
/// quantile of an even count is the mean of the middle two); NaN for none.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Run one closed-loop client per element of `clients`, each on its own thread, for `dur`:
/// each calls `op` again as soon as the last call returned, timing every call. All threads start
/// together (a barrier), so the wall time covers the concurrent part only.
///
/// # Errors
/// The first error any client's `op` returned (the others stop at their deadline).
pub fn run_clients<C: Send>(
    clients: &mut [C],
    dur: Duration,
    op: impl Fn(&mut C) -> Result<()> + Sync,
) -> Result<Sample> {
    let barrier = Barrier::new(clients.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .map(|client| {
                let (barrier, op) = (&barrier, &op);
                s.spawn(move || -> Result<Vec<u64>> {
                    barrier.wait();
                    let end = Instant::now() + dur;
                    let mut lat = Vec::with_capacity(4096);
                    loop {
                        let t = Instant::now();
                        if t >= end {
                            return Ok(lat);
                        }
                        op(client)?;
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut lat_ns = Vec::new();
        let mut failure = None;
        for h in handles {
            match h.join() {
                Ok(Ok(l)) => lat_ns.extend(l),
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(anyhow!("a client thread panicked"))),
            }
        }
        let wall = start.elapsed();
        match failure {
            Some(e) => Err(e),
            None => Ok(Sample {
                ops: lat_ns.len() as u64,
                wall,
                lat_ns,
            }),
        }
    })
}

/// Bursts of `width` requests started at once (a boot starting hundreds of units), repeated
/// until `dur` is used up: each burst's threads are spawned first and released together, and
/// only the burst itself is timed.
///
/// # Errors
/// The first error any request returned.
pub fn run_bursts(
    width: usize,
    dur: Duration,
    op: impl Fn() -> Result<()> + Sync,
) -> Result<Sample> {
    let mut total = Sample::default();
    let end = Instant::now() + dur;
    loop {
        total.merge(burst(width, &op)?);
        if Instant::now() >= end {
            return Ok(total);
        }
    }
}

fn burst(width: usize, op: &(impl Fn() -> Result<()> + Sync)) -> Result<Sample> {
    let barrier = Barrier::new(width + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..width)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || -> Result<u64> {
                    barrier.wait();
                    let t = Instant::now();
                    op()?;
                    Ok(t.elapsed().as_nanos() as u64)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut lat_ns = Vec::with_capacity(width);
        let mut failure = None;
        for h in handles {
            match h.join() {
                Ok(Ok(l)) => lat_ns.push(l),
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(anyhow!("a fetch thread panicked"))),
            }
        }
        let wall = start.elapsed();
        match failure {
            Some(e) => Err(e),
            None => Ok(Sample {
                ops: lat_ns.len() as u64,
                wall,
                lat_ns,
            }),
        }
    })
}

/// Peak and current resident set of a process, in bytes (`VmHWM`, `VmRSS` of
/// `/proc/PID/status`).
///
/// # Errors
/// The file can't be read or lacks the fields.
pub fn rss(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        let value = status_field(&text, name).ok_or_else(|| anyhow!("{path} has no {name}"))?;
        let kib: u64 = value
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{path}: {name}: {value}"))?;
        Ok(kib * 1024)
    };
    Ok((field("VmHWM")?, field("VmRSS")?))
}

/// A small, fast, deterministic generator for picking names at random (xorshift64*): the
/// choice needs no cryptographic quality, only to defeat caches and prefetchers.
#[derive(Debug, Clone)]
pub struct Pick(u64);

impl Pick {
    /// A generator seeded by `seed` (any value; zero is mapped away).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A number below `n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}
