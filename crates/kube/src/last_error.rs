//! Retry loops (watches, the lease, file reloads) meet lasting failures such
//! as missing RBAC; logging every retry would bury everything else. A
//! failure is logged when it starts or changes.

use std::fmt::Display;

/// The last error a retry loop reported.
#[derive(Debug, Default)]
pub struct LastError(String);

impl LastError {
    /// Whether `error` differs from the last one reported; remembers it.
    pub fn is_new(&mut self, error: &impl Display) -> bool {
        let error = error.to_string();
        if error == self.0 {
            return false;
        }
        self.0 = error;
        true
    }

    /// The loop recovered: the next failure is news again.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_news_when_it_starts_changes_or_returns_after_recovery() {
        let mut last = LastError::default();
        assert!(last.is_new(&"forbidden"));
        assert!(!last.is_new(&"forbidden"));
        assert!(last.is_new(&"timeout"));
        last.clear();
        assert!(last.is_new(&"timeout"));
    }
}
