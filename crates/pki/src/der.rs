//! Just enough DER to write certificates.
//!
//! meshca writes every byte it signs itself rather than going through a
//! certificate builder: names are copied as raw DER (a plugged-in CA's subject,
//! a Kubernetes CSR subject with repeated `O=`), the public key is copied from
//! the CSR's SubjectPublicKeyInfo untouched, and nothing from the request is
//! ever re-interpreted into a field by accident.

use time::OffsetDateTime;

pub const BOOLEAN: u8 = 0x01;
pub const INTEGER: u8 = 0x02;
pub const BIT_STRING: u8 = 0x03;
pub const OCTET_STRING: u8 = 0x04;
pub const NULL: u8 = 0x05;
pub const OID: u8 = 0x06;
pub const UTF8_STRING: u8 = 0x0c;
pub const UTC_TIME: u8 = 0x17;
pub const GENERALIZED_TIME: u8 = 0x18;
pub const SEQUENCE: u8 = 0x30;
pub const SET: u8 = 0x31;

/// Context-specific tag `[n]`, constructed (explicit) or primitive (implicit).
pub const fn context(n: u8, constructed: bool) -> u8 {
    0x80 | if constructed { 0x20 } else { 0 } | n
}

/// Tag, length and the concatenation of `parts`.
pub fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len + 6);
    out.push(tag);
    push_len(len, &mut out);
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

fn push_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    out.push(0x80 | (bytes.len() - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

pub fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, parts)
}

/// A non-negative INTEGER from big-endian magnitude bytes, minimally encoded.
pub fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let skip = magnitude.iter().take_while(|b| **b == 0).count();
    let digits = &magnitude[skip..];
    match digits.first() {
        None => tlv(INTEGER, &[&[0]]),
        Some(first) if first & 0x80 != 0 => tlv(INTEGER, &[&[0], digits]),
        Some(_) => tlv(INTEGER, &[digits]),
    }
}

pub fn small_integer(value: u64) -> Vec<u8> {
    unsigned_integer(&value.to_be_bytes())
}

pub fn boolean(value: bool) -> Vec<u8> {
    tlv(BOOLEAN, &[&[if value { 0xff } else { 0 }]])
}

pub fn octet_string(bytes: &[u8]) -> Vec<u8> {
    tlv(OCTET_STRING, &[bytes])
}

/// A BIT STRING holding whole bytes (signatures, keys).
pub fn bit_string(bytes: &[u8]) -> Vec<u8> {
    tlv(BIT_STRING, &[&[0], bytes])
}

/// An OBJECT IDENTIFIER from its dotted arcs.
pub fn oid(arcs: &[u64]) -> Vec<u8> {
    let mut body = Vec::with_capacity(arcs.len() * 2);
    let (first, rest) = match arcs {
        [a, b, rest @ ..] => (a * 40 + b, rest),
        _ => panic!("an OID has at least two arcs"),
    };
    for arc in std::iter::once(&first).chain(rest) {
        let mut groups = [0u8; 10];
        let mut n = 0;
        let mut v = *arc;
        loop {
            groups[n] = (v & 0x7f) as u8;
            n += 1;
            v >>= 7;
            if v == 0 {
                break;
            }
        }
        for i in (0..n).rev() {
            body.push(groups[i] | if i > 0 { 0x80 } else { 0 });
        }
    }
    tlv(OID, &[&body])
}

/// RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
pub fn time(t: OffsetDateTime) -> Vec<u8> {
    let t = t.to_offset(time::UtcOffset::UTC);
    let (y, mo, d, h, mi, s) = (
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
    );
    if (1950..2050).contains(&y) {
        let text = format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y.rem_euclid(100));
        tlv(UTC_TIME, &[text.as_bytes()])
    } else {
        let text = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z");
        tlv(GENERALIZED_TIME, &[text.as_bytes()])
    }
}

/// A DER KeyUsage-style named BIT STRING: bit 0 is the most significant bit of
/// the first byte, and trailing zero bits are dropped as DER requires.
pub fn named_bits(bits: u16) -> Vec<u8> {
    let mut bytes = [0u8; 2];
    for i in 0..16 {
        if bits & (1 << i) != 0 {
            bytes[i / 8] |= 0x80 >> (i % 8);
        }
    }
    let used = if bytes[1] != 0 {
        2
    } else if bytes[0] != 0 {
        1
    } else {
        0
    };
    if used == 0 {
        return tlv(BIT_STRING, &[&[0]]);
    }
    let unused_bits = bytes[used - 1].trailing_zeros() as u8;
    tlv(BIT_STRING, &[&[unused_bits], &bytes[..used]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_use_the_minimal_number_of_octets() {
        assert_eq!(
            &tlv(OCTET_STRING, &[&[7u8; 0x80]])[..3],
            &[0x04, 0x81, 0x80]
        );
        assert_eq!(
            &tlv(OCTET_STRING, &[&[7u8; 0x1234]])[..4],
            &[0x04, 0x82, 0x12, 0x34]
        );
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        assert_eq!(unsigned_integer(&[0, 0, 5]), vec![2, 1, 5]);
        assert_eq!(unsigned_integer(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(unsigned_integer(&[]), vec![2, 1, 0]);
        assert_eq!(small_integer(2), vec![2, 1, 2]);
    }

    #[test]
    fn oids_encode_like_openssl() {
        // 1.2.840.113549.1.1.11 sha256WithRSAEncryption
        assert_eq!(
            oid(&[1, 2, 840, 113549, 1, 1, 11]),
            vec![6, 9, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 1, 1, 0x0b]
        );
        assert_eq!(oid(&[2, 5, 29, 17]), vec![6, 3, 0x55, 0x1d, 0x11]);
    }

    #[test]
    fn key_usage_bits_drop_trailing_zeros() {
        // digitalSignature | keyEncipherment = bits 0 and 2 -> 0xa0, 5 unused bits.
        assert_eq!(named_bits(0b101), vec![3, 2, 5, 0xa0]);
        // keyCertSign | cRLSign = bits 5 and 6 -> 0x06, 1 unused bit.
        assert_eq!(named_bits(0b110_0000), vec![3, 2, 1, 0x06]);
        // decipherOnly = bit 8 -> second byte 0x80, 7 unused bits.
        assert_eq!(named_bits(1 << 8), vec![3, 3, 7, 0, 0x80]);
    }

    #[test]
    fn times_switch_to_generalized_in_2050() {
        let t = time::macros::datetime!(2049-12-31 23:59:59 UTC);
        assert_eq!(time(t), tlv(UTC_TIME, &[b"491231235959Z"]));
        let t = time::macros::datetime!(2050-01-01 00:00:00 UTC);
        assert_eq!(time(t), tlv(GENERALIZED_TIME, &[b"20500101000000Z"]));
    }
}
