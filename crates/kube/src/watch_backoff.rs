//! The backoff of watches that requests wait on (the RA server's CSR
//! watch, the signer's CSR controllers).
//!
//! kube-runtime's default (client-go's reflector: 0.8 s doubling to 30 s,
//! reset only after 120 s without errors) is kind to a struggling
//! apiserver, but after an outage of ~10 s its next attempt can come ~13 s
//! after the apiserver is back, and every RA request waits that long or
//! times out (measured: no certificate within 6 s of a restarted apiserver
//! being ready). A CA's watch is one per process, so retrying at least every
//! 5 s costs the apiserver nothing.

use std::time::Duration;

use kube::runtime::utils::Backoff;

/// 0.5 s doubling to at most 5 s; back to 0.5 s once the watch delivers.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

const FIRST: Duration = Duration::from_millis(500);
const LONGEST: Duration = Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(LONGEST);
        Some(now)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_five_seconds_and_resets() {
        let mut b = WatchBackoff::default();
        let seen: Vec<u64> = b.by_ref().take(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(seen, [500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Some(FIRST));
    }
}
