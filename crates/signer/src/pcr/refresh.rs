//! When the kubelet should refresh a pod certificate: `beginRefreshAt`,
//! a point of the signer's refresh window spread per request.

use std::time::Duration;

use k8s_openapi::api::certificates::v1beta1::PodCertificateRequest;
use time::OffsetDateTime;

/// The apiserver wants `beginRefreshAt` at least this far from both ends.
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// The share of a certificate's lifetime after which the kubelet should
/// refresh it: a point between `from` and `to` percent, chosen per request
/// so that a node's pods, which start together, do not all come back
/// together. Default 50-70% (Istio's agents renew at 50%).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshWindow {
    from_percent: u8,
    to_percent: u8,
}

impl Default for RefreshWindow {
    fn default() -> Self {
        RefreshWindow {
            from_percent: 50,
            to_percent: 70,
        }
    }
}

impl std::str::FromStr for RefreshWindow {
    type Err = String;

    /// `FROM-TO` in percent of the lifetime (`50-70`), or one number.
    fn from_str(s: &str) -> Result<Self, String> {
        let percent = |p: &str| {
            p.trim()
                .trim_end_matches('%')
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| format!("{p:?} is not a percentage from 0 to 100"))
        };
        let (from, to) = match s.split_once('-') {
            Some((from, to)) => (percent(from)?, percent(to)?),
            None => (percent(s)?, percent(s)?),
        };
        if from > to {
            return Err(format!("refresh window {s:?}: {from}% is after {to}%"));
        }
        Ok(RefreshWindow {
            from_percent: from,
            to_percent: to,
        })
    }
}

/// When the kubelet should start refreshing: a point of `window`, spread by
/// `seed`; always at least 10 minutes from either end (the apiserver's rule),
/// so a window starting at 0% means "as early as the API allows".
pub fn refresh_time(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    window: RefreshWindow,
    seed: u64,
) -> OffsetDateTime {
    let lifetime = (not_after - not_before).whole_seconds().max(0);
    // seed / 2^64 in [0, 1), in thousandths.
    let permille = (((seed >> 32) * 1000) >> 32) as i64;
    let from = i64::from(window.from_percent);
    let spread = i64::from(window.to_percent - window.from_percent);
    let offset = lifetime * from / 100 + lifetime * spread / 100 * permille / 1000;
    let earliest = not_before + REFRESH_MARGIN;
    let latest = not_after - REFRESH_MARGIN;
    (not_before + time::Duration::seconds(offset)).clamp(earliest, latest.max(earliest))
}

/// FNV-1a of the request's UID (or name): stable for one request, spread
/// across requests.
pub(super) fn jitter_seed(pcr: &PodCertificateRequest) -> u64 {
    let key = pcr
        .metadata
        .uid
        .as_deref()
        .or(pcr.metadata.name.as_deref())
        .unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain(pcr.spec.pod_uid.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
