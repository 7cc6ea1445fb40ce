//! HDR histograms to and from the standard compressed V2 encoding (base64 of
//! deflated V2), the one HdrHistogram's own tools read: in `--hdr-log` interval
//! logs, in the `hdr` field of JSON reports, and read back by `latprobe merge`.
//!
//! Encoding is the `hdrhistogram` crate's. Decoding checks the header first:
//! the crate sizes its buffers from it (a 4-byte length can ask for 4 GiB), and
//! `merge` reads files from other hosts, so a hostile or corrupt entry must
//! fail with a message, not with the machine's memory.

use std::io::Read;

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use hdrhistogram::{
    serialization::{Deserializer, Serializer, V2DeflateSerializer},
    Histogram,
};

/// Longest encoded histogram accepted (a 2-digit histogram of 1 ns to 68 s
/// with every bucket counted is about 20 KiB encoded).
pub const MAX_ENCODED_BYTES: usize = 1 << 20;
/// Most bytes an entry may inflate to, and the most counts it may declare.
const MAX_PAYLOAD_BYTES: usize = 16 << 20;
/// Finer histograms than this would take megabytes each to rebuild.
const MAX_SIGNIFICANT_DIGITS: u32 = 3;

/// Cookie bases; bits 4-7 carry a word size that decoders ignore.
const V2_COOKIE: u32 = 0x1c84_9303;
const V2_COMPRESSED_COOKIE: u32 = 0x1c84_9304;
const COOKIE_WORD_SIZE_BITS: u32 = 0xf0;
/// Bytes of a V2 header: cookie, payload length, normalizing offset, digits,
/// lowest, highest, integer-to-double ratio.
const V2_HEADER_BYTES: usize = 40;

/// The base64 text of `hist`, compressed V2.
pub fn encode(hist: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new().serialize(hist, &mut bytes).expect("serializing into memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes base64 text of a V2 histogram, compressed or not, within bounds.
pub fn decode(text: &str) -> Result<Histogram<u64>> {
    ensure!(
        text.len() <= MAX_ENCODED_BYTES,
        "an encoded histogram of {} bytes is over the limit of {MAX_ENCODED_BYTES}",
        text.len()
    );
    let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).context("not base64")?;
    let plain = match be_u32(&bytes, 0)? & !COOKIE_WORD_SIZE_BITS {
        V2_COOKIE => bytes,
        V2_COMPRESSED_COOKIE => inflate(&bytes)?,
        other => bail!("not an HDR histogram (cookie {other:#x})"),
    };
    check_header(&plain)?;
    Deserializer::new().deserialize(&mut plain.as_slice()).map_err(|e| anyhow::anyhow!("corrupt HDR histogram: {e:?}"))
}

/// Inflates the body of a compressed entry into an uncompressed V2 entry,
/// reading no more than [`MAX_PAYLOAD_BYTES`].
fn inflate(bytes: &[u8]) -> Result<Vec<u8>> {
    let len = be_u32(bytes, 4)? as usize;
    let body = bytes.get(8..8 + len).context("truncated compressed HDR histogram")?;
    let mut plain = Vec::new();
    flate2::read::ZlibDecoder::new(body)
        .take(MAX_PAYLOAD_BYTES as u64 + 1)
        .read_to_end(&mut plain)
        .context("corrupt compressed HDR histogram")?;
    ensure!(plain.len() <= MAX_PAYLOAD_BYTES, "a compressed HDR histogram inflates past {MAX_PAYLOAD_BYTES} bytes");
    Ok(plain)
}

/// Refuses headers that would make the decoder allocate more than the entry
/// holds: a payload longer than what follows, or bounds too fine or too wide.
fn check_header(plain: &[u8]) -> Result<()> {
    ensure!(plain.len() >= V2_HEADER_BYTES, "truncated HDR histogram");
    ensure!(be_u32(plain, 0)? & !COOKIE_WORD_SIZE_BITS == V2_COOKIE, "not an HDR histogram");
    let payload = be_u32(plain, 4)? as usize;
    ensure!(
        payload <= plain.len() - V2_HEADER_BYTES,
        "HDR histogram declares {payload} bytes of counts but holds fewer"
    );
    let digits = be_u32(plain, 12)?;
    ensure!(
        digits <= MAX_SIGNIFICANT_DIGITS,
        "HDR histogram with {digits} significant digits (at most {MAX_SIGNIFICANT_DIGITS})"
    );
    Ok(())
}

fn be_u32(bytes: &[u8], at: usize) -> Result<u32> {
    let word = bytes.get(at..at + 4).context("truncated HDR histogram")?;
    Ok(u32::from_be_bytes(word.try_into().expect("four bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 68_000_000_000, 2).unwrap();
        for v in [1u64, 900, 5_000_000, 5_010_000, 68_000_000_000] {
            h.record(v).unwrap();
        }
        h.record_n(1234, 1_000_000).unwrap();
        h
    }

    #[test]
    fn round_trips_exactly() {
        let h = sample();
        let back = decode(&encode(&h)).unwrap();
        assert_eq!(back.len(), h.len());
        let pairs = |h: &Histogram<u64>| {
            h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect::<Vec<_>>()
        };
        assert_eq!(pairs(&back), pairs(&h));
    }

    #[test]
    fn refuses_a_payload_longer_than_the_entry() {
        let mut plain = Vec::new();
        hdrhistogram::serialization::V2Serializer::new().serialize(&sample(), &mut plain).unwrap();
        plain[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let text = base64::engine::general_purpose::STANDARD.encode(&plain);
        let err = decode(&text).unwrap_err().to_string();
        assert!(err.contains("declares"), "{err}");
    }

    #[test]
    fn refuses_garbage_and_huge_input() {
        assert!(decode("not base64 !!").is_err());
        assert!(decode(&base64::engine::general_purpose::STANDARD.encode(b"HISTO")).is_err());
        assert!(decode(&"A".repeat(MAX_ENCODED_BYTES + 4)).is_err());
        // A deflate bomb: megabytes of zeros behind a compressed cookie.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut z, &vec![0u8; MAX_PAYLOAD_BYTES + 100]).unwrap();
        let body = z.finish().unwrap();
        let mut bytes = (V2_COMPRESSED_COOKIE | 0x10).to_be_bytes().to_vec();
        bytes.extend((body.len() as u32).to_be_bytes());
        bytes.extend(body);
        let err = decode(&base64::engine::general_purpose::STANDARD.encode(&bytes)).unwrap_err().to_string();
        assert!(err.contains("inflates past"), "{err}");
    }
}
