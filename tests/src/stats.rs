//! Statistics of repeated, paired benchmark rounds: pure functions, no I/O.
//!
//! A benchmark runs its modes in rounds, each round every mode once, the
//! order rotated from round to round ([`rotation`]) so no mode always runs
//! first (cold caches) or last (a build starting meanwhile). Each mode is
//! summarised by the median and the min–max of its rounds ([`Spread`]);
//! each comparison by the *paired* ratios ([`paired_ratios`]): round i's
//! mode over round i's baseline, so a slow round slows both sides of its
//! ratio instead of the comparison.

/// A paired comparison whose ratios spread wider than this fraction of
/// their median either side is flagged as noisy.
pub const NOISY_SPREAD: f64 = 0.15;

/// A measured window in which processes outside the benchmark used more
/// than this share of the machine's CPU time is flagged as busy.
pub const BUSY_SHARE: f64 = 0.10;

/// Median and range of a set of measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// The spread of `values` (NaNs ignored); None when nothing is left.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            f64::midpoint(v[n / 2 - 1], v[n / 2])
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// The range reaches further than `fraction` of the median from it, on
    /// either side (0.15: outside median × 0.85 … median × 1.15).
    pub fn wider_than(&self, fraction: f64) -> bool {
        let m = self.median.abs();
        self.min < self.median - fraction * m || self.max > self.median + fraction * m
    }
}

/// "K of N measured windows (up to X%: WORST)" when some window's
/// other-process share of the CPU passed [`BUSY_SHARE`]; `windows` pairs
/// each window with that share, `describe` names the worst one.
pub fn busy_windows<W>(windows: &[(W, f64)], describe: impl Fn(&W) -> String) -> Option<String> {
    let busy = windows.iter().filter(|w| w.1 > BUSY_SHARE).count();
    let (worst, share) = windows.iter().max_by(|a, b| a.1.total_cmp(&b.1))?;
    (busy > 0).then(|| {
        format!(
            "{busy} of {} measured windows (up to {:.0}%: {})",
            windows.len(),
            share * 100.0,
            describe(worst)
        )
    })
}

/// The busy-machine warning line for the windows [`busy_windows`] found.
pub fn busy_warning(windows: &str) -> String {
    format!(
        "busy machine: in {windows} processes outside the benchmark used more than {:.0}% of the CPU; \
         compare only runs of a quiet machine",
        BUSY_SHARE * 100.0
    )
}

/// The noisy-comparison warning for `what` (e.g. "spright-on / reference
/// requests/s") when its paired ratios spread wider than [`NOISY_SPREAD`].
pub fn noisy_warning(what: &str, paired: &Spread) -> Option<String> {
    paired.wider_than(NOISY_SPREAD).then(|| {
        format!(
            "noisy: {what}: paired ratios {:.2}–{:.2} around a median of {:.2}, wider than ±{:.0}%; \
             rerun on a quiet machine or with more --reps",
            paired.min,
            paired.max,
            paired.median,
            NOISY_SPREAD * 100.0
        )
    })
}

/// The median of `values` (NaNs ignored).
pub fn median(values: &[f64]) -> Option<f64> {
    Spread::of(values).map(|s| s.median)
}

/// Round by round, `values[i] / baseline[i]`; rounds whose baseline is zero
/// (or either side is missing) give no ratio.
pub fn paired_ratios(values: &[f64], baseline: &[f64]) -> Vec<f64> {
    values
        .iter()
        .zip(baseline)
        .filter(|(_, b)| **b != 0.0)
        .map(|(v, b)| v / b)
        .collect()
}

/// The order in which round `round` runs `n` modes: 0 1 2 …, then 1 2 … 0,
/// and so on; over `n` rounds every mode runs once in every position.
pub fn rotation(n: usize, round: usize) -> Vec<usize> {
    (0..n).map(|i| (i + round) % n.max(1)).collect()
}

/// Runs `reps` rounds of `modes` in [`rotation`] order; `run(round, mode)`
/// measures one. The result is indexed `[round][mode]` in the order of
/// `modes`, whatever order they ran in. Stops at the first error.
pub fn run_rounds<M: Copy, O>(
    modes: &[M],
    reps: usize,
    mut run: impl FnMut(usize, M) -> anyhow::Result<O>,
) -> anyhow::Result<Vec<Vec<O>>> {
    let mut rounds = Vec::with_capacity(reps);
    for round in 0..reps {
        let mut slots: Vec<Option<O>> = modes.iter().map(|_| None).collect();
        for i in rotation(modes.len(), round) {
            slots[i] = Some(run(round, modes[i])?);
        }
        rounds.push(slots.into_iter().flatten().collect());
    }
    Ok(rounds)
}

/// The share of the machine's CPU time (0–1) that went to something other
/// than the benchmark during a window: busy time of every CPU (`/proc/stat`)
/// minus the CPU time the benchmark counted for its own processes, over the
/// window's wall time × CPUs. Kernel threads working for the benchmark
/// (ksoftirqd, kworkers) count as "other", so a quiet machine shows a few
/// percent rather than zero.
pub fn other_cpu_share(node_busy_us: u64, own_us: u64, window_us: u64, cpus: usize) -> f64 {
    let capacity = window_us as f64 * cpus.max(1) as f64;
    if capacity <= 0.0 {
        return 0.0;
    }
    node_busy_us.saturating_sub(own_us) as f64 / capacity
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn spread_has_min_max_and_count() {
        let s = Spread::of(&[10.0, 12.0, 9.0, 11.0, 30.0]).unwrap();
        assert_eq!(
            s,
            Spread {
                median: 11.0,
                min: 9.0,
                max: 30.0,
                n: 5
            }
        );
        assert!(s.wider_than(NOISY_SPREAD));
        let tight = Spread::of(&[1.0, 1.1, 0.9]).unwrap();
        assert!(!tight.wider_than(NOISY_SPREAD));
        // Just outside on the low side only.
        assert!(Spread::of(&[0.84, 1.0, 1.0]).unwrap().wider_than(0.15));
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn ratios_pair_rounds_and_skip_zero_baselines() {
        let base = [100.0, 50.0, 0.0, 80.0];
        let other = [120.0, 70.0, 10.0];
        let r = paired_ratios(&other, &base);
        assert_eq!(r, vec![1.2, 1.4]);
        // Pairing matters: the medians' ratio is not the paired median.
        let a = [100.0, 200.0, 300.0];
        let b = [110.0, 180.0, 360.0];
        let paired = Spread::of(&paired_ratios(&b, &a)).unwrap();
        assert!((paired.median - 1.1).abs() < 1e-12);
        assert!((paired.min - 0.9).abs() < 1e-12);
        assert!((paired.max - 1.2).abs() < 1e-12);
    }

    #[test]
    fn rotation_puts_every_mode_in_every_position() {
        assert_eq!(rotation(3, 0), vec![0, 1, 2]);
        assert_eq!(rotation(3, 1), vec![1, 2, 0]);
        assert_eq!(rotation(3, 2), vec![2, 0, 1]);
        assert_eq!(rotation(3, 3), vec![0, 1, 2]);
        assert_eq!(rotation(1, 5), vec![0]);
        assert!(rotation(0, 2).is_empty());
        for pos in 0..4 {
            let mut seen: Vec<usize> = (0..4).map(|r| rotation(4, r)[pos]).collect();
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1, 2, 3]);
        }
    }

    #[test]
    fn rounds_run_rotated_and_come_back_in_mode_order() {
        let mut order = Vec::new();
        let rounds = run_rounds(&['a', 'b', 'c'], 2, |round, m| {
            order.push((round, m));
            Ok(format!("{m}{round}"))
        })
        .unwrap();
        assert_eq!(
            order,
            vec![(0, 'a'), (0, 'b'), (0, 'c'), (1, 'b'), (1, 'c'), (1, 'a')]
        );
        assert_eq!(rounds, vec![vec!["a0", "b0", "c0"], vec!["a1", "b1", "c1"]]);
        let failed = run_rounds(&[1, 2], 3, |round, m| {
            anyhow::ensure!(round == 0 || m != 2, "boom");
            Ok(m)
        });
        assert!(failed.is_err());
    }

    #[test]
    fn other_cpu_is_busy_time_not_counted_as_own() {
        // 2 CPUs for 1 s: 2 s of capacity; 1.5 s busy, 1.3 s of it ours.
        let s = other_cpu_share(1_500_000, 1_300_000, 1_000_000, 2);
        assert!((s - 0.1).abs() < 1e-12);
        // Own time above node time (different clocks' rounding) is zero.
        assert!(other_cpu_share(100, 200, 1_000, 2).abs() < f64::EPSILON);
        assert!(other_cpu_share(100, 0, 0, 2).abs() < f64::EPSILON);
    }
}
