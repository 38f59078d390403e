//! PEM in and out, strict enough to give each malformed input its own error.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// One `-----BEGIN <label>-----` block. The bytes are zeroized on drop because
/// the same parser reads private keys, and `Debug` shows only the label and
/// the length.
pub struct PemBlock {
    pub label: String,
    pub der: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for PemBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemBlock")
            .field("label", &self.label)
            .field("der_len", &self.der.len())
            .finish_non_exhaustive()
    }
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
///
/// Key text never lands in a buffer that is not zeroized: lines are read in
/// place, and the base64 body and the decoded bytes go into `Zeroizing`
/// buffers sized up front, so they are never reallocated (which would leave
/// the old copy behind).
pub fn parse_all(input: &[u8]) -> Result<Vec<PemBlock>, PemError> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, Zeroizing<Vec<u8>>)> = None;
    for raw_line in input.split(|b| *b == b'\n') {
        let line = raw_line.trim_ascii();
        match &mut current {
            None => {
                if let Some(label) = armor(line, b"-----BEGIN ") {
                    // The body is at most the rest of the input.
                    let body = Zeroizing::new(Vec::with_capacity(input.len()));
                    current = Some((String::from_utf8_lossy(label).into_owned(), body));
                }
            }
            Some((label, body)) => {
                if let Some(end) = armor(line, b"-----END ") {
                    if end != label.as_bytes() {
                        return Err(PemError::MismatchedEnd {
                            begin: label.clone(),
                            end: String::from_utf8_lossy(end).into_owned(),
                        });
                    }
                    let mut der = Zeroizing::new(Vec::with_capacity(base64::decoded_len_estimate(
                        body.len(),
                    )));
                    STANDARD
                        .decode_vec(body.as_slice(), &mut der)
                        .map_err(|_| PemError::Base64(label.clone()))?;
                    blocks.push(PemBlock {
                        label: std::mem::take(label),
                        der,
                    });
                    current = None;
                } else {
                    body.extend_from_slice(line);
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

fn armor<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    line.strip_prefix(prefix)?.strip_suffix(b"-----")
}

/// PEM text with 64-column lines and a trailing newline.
/// The base64 text is zeroized and the output sized up front (never
/// reallocated), since the caller may be writing a key; a caller writing a
/// key wraps the result in `Zeroizing`.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = Zeroizing::new(STANDARD.encode(der));
    let lines = b64.len().div_ceil(64);
    let mut out = String::with_capacity(b64.len() + lines + 2 * label.len() + 32);
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

    #[test]
    fn debug_shows_the_label_and_length_only() {
        let block = &parse_all(encode("PRIVATE KEY", &[0xAB; 40]).as_bytes()).unwrap()[0];
        assert_eq!(
            format!("{block:?}"),
            "PemBlock { label: \"PRIVATE KEY\", der_len: 40, .. }"
        );
    }

    #[test]
    fn encoding_never_outgrows_its_first_allocation() {
        for len in [0, 1, 47, 48, 49, 96, 1000, 1217] {
            let out = encode("PRIVATE KEY", &vec![7; len]);
            let b64 = len.div_ceil(3) * 4;
            let expected = b64 + b64.div_ceil(64) + 2 * "PRIVATE KEY".len() + 32;
            assert_eq!(out.len(), expected, "{len}");
            // Filled exactly: a reallocation would have left a copy behind
            // (and doubled the capacity).
            assert_eq!(out.capacity(), out.len(), "{len}");
        }
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
