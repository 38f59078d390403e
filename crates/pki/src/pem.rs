//! PEM in and out, strict enough to give each malformed input its own error.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// One `-----BEGIN <label>-----` block. The bytes are zeroized on drop because
/// the same parser reads private keys.
#[derive(Debug)]
pub struct PemBlock {
    pub label: String,
    pub der: Zeroizing<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("no PEM block found")]
    NoBlock,
    #[error("PEM block `{0}` has no END line")]
    Unterminated(String),
    #[error("PEM block `{begin}` ends with `{end}`")]
    MismatchedEnd { begin: String, end: String },
    #[error("PEM block `{0}` is not valid base64")]
    Base64(String),
}

/// All PEM blocks in `input`, in order. Text outside blocks is ignored, as
/// OpenSSL and Go do (files often carry `openssl x509 -text` output).
pub fn parse_all(input: &[u8]) -> Result<Vec<PemBlock>, PemError> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, Zeroizing<String>)> = None;
    for raw_line in input.split(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(raw_line);
        let line = line.trim();
        match &mut current {
            None => {
                if let Some(label) = armor(line, "-----BEGIN ") {
                    current = Some((label.to_owned(), Zeroizing::new(String::new())));
                }
            }
            Some((label, body)) => {
                if let Some(end) = armor(line, "-----END ") {
                    if end != label {
                        return Err(PemError::MismatchedEnd {
                            begin: label.clone(),
                            end: end.to_owned(),
                        });
                    }
                    let der = STANDARD
                        .decode(body.as_bytes())
                        .map_err(|_| PemError::Base64(label.clone()))?;
                    blocks.push(PemBlock {
                        label: std::mem::take(label),
                        der: Zeroizing::new(der),
                    });
                    current = None;
                } else {
                    body.push_str(line);
                }
            }
        }
    }
    if let Some((label, _)) = current {
        return Err(PemError::Unterminated(label));
    }
    if blocks.is_empty() {
        return Err(PemError::NoBlock);
    }
    Ok(blocks)
}

fn armor<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.strip_prefix(prefix)?.strip_suffix("-----")
}

/// PEM text with 64-column lines and a trailing newline.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 32);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_around_blocks_is_ignored() {
        let text = format!(
            "Certificate:\n  junk\n{}trailer\n",
            encode("CERTIFICATE", b"abc")
        );
        let blocks = parse_all(text.as_bytes()).unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(&blocks[0].der[..], b"abc");
    }

    #[test]
    fn malformed_blocks_have_their_own_errors() {
        assert_eq!(parse_all(b"hello").unwrap_err(), PemError::NoBlock);
        assert_eq!(
            parse_all(b"-----BEGIN X-----\nAAAA\n").unwrap_err(),
            PemError::Unterminated("X".into())
        );
        assert_eq!(
            parse_all(b"-----BEGIN X-----\nAAAA\n-----END Y-----\n").unwrap_err(),
            PemError::MismatchedEnd {
                begin: "X".into(),
                end: "Y".into()
            }
        );
        assert_eq!(
            parse_all(b"-----BEGIN X-----\n!!!!\n-----END X-----\n").unwrap_err(),
            PemError::Base64("X".into())
        );
    }

    #[test]
    fn crlf_line_endings_are_accepted() {
        let text = encode("CERTIFICATE", &[1, 2, 3]).replace('\n', "\r\n");
        assert_eq!(&parse_all(text.as_bytes()).unwrap()[0].der[..], &[1, 2, 3]);
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(der in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let blocks = parse_all(encode("CERTIFICATE REQUEST", &der).as_bytes()).unwrap();
            prop_assert_eq!(blocks.len(), 1);
            prop_assert_eq!(&blocks[0].label, "CERTIFICATE REQUEST");
            prop_assert_eq!(&blocks[0].der[..], &der[..]);
        }

        #[test]
        fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..500)) {
            let _ = parse_all(&input);
        }
    }
}
