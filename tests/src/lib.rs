//! Shared machinery of spright's integration tests.
//!
//! - [`privileged::require`]: the gate of every privileged test (skips with a
//!   message outside CI, fails under `CI=true`).
//! - [`sandbox`]: a simulated node — network namespaces, a bridge, veths, a
//!   cgroup v2 directory and a bpffs pin directory that the test owns and that
//!   are removed on drop, also when the test panics.
//! - [`scenario`]: end-to-end scenarios shared by tests and the demo binary.
//! - [`stats`]: medians, ranges and paired ratios of repeated benchmark
//!   rounds, and the rotation the rounds run in.
//! - [`procgroup`]: children in their own process group, killed as one.
//! - [`plot`]: the benchmarks' pictures (SVG and PNG).
//! - [`soak`]: the soak with churn (load with verified replies while pods
//!   join and leave, meshd restarts and the programs are upgraded).

pub mod apps;
pub mod chain;
pub mod cni;
pub mod kubeapi;
pub mod kubelet;
pub mod meshd;
pub mod plot;
pub mod pod;
pub mod privileged;
pub mod procgroup;
pub mod runtime;
pub mod sandbox;
pub mod scenario;
pub mod sdk_lang;
pub mod services;
pub mod shm_csi;
pub mod soak;
pub mod stats;
pub mod zoo;

/// 64-bit FNV-1a, used to compare what was sent with what arrived (the
/// SDK's, which also defines the benchmark functions' work).
pub use spright_shm::work::fnv1a;

/// A deterministic byte stream (so corruption, loss and reordering all change
/// the hash).
pub mod pattern {
    /// Fills `buf` with the stream's bytes starting at stream offset `offset`.
    pub fn fill(buf: &mut [u8], offset: u64) {
        for (i, b) in buf.iter_mut().enumerate() {
            let x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            *b = (x >> 56) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_dependent() {
        let mut whole = [0u8; 64];
        pattern::fill(&mut whole, 0);
        let mut tail = [0u8; 32];
        pattern::fill(&mut tail, 32);
        assert_eq!(&whole[32..], &tail);
        let mut swapped = whole;
        swapped.swap(3, 40);
        assert_ne!(
            fnv1a::feed(fnv1a::START, &whole),
            fnv1a::feed(fnv1a::START, &swapped)
        );
    }
}
