//! Durations as Istio's environment variables write them (Go's
//! `time.Duration` strings such as `24h0m0s` or `1.5h`) or as humans do (`10years`).

use std::time::Duration;

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_go(text)
        .or_else(|| humantime::parse_duration(text).ok())
        .ok_or_else(|| {
            format!("invalid duration {text:?} (examples: 24h, 24h0m0s, 90s, 2160h, 10years)")
        })
}

fn parse_go(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_and_human_durations_parse() {
        assert_eq!(
            parse_duration("24h0m0s").unwrap(),
            Duration::from_secs(86400)
        );
        assert_eq!(
            parse_duration("2160h").unwrap(),
            Duration::from_secs(2160 * 3600)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("10years").unwrap(),
            humantime::parse_duration("10years").unwrap()
        );
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }
}
