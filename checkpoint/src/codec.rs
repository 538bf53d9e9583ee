//! Page codec: how one 4 KiB guest page travels on the wire.
//!
//! Each page is sent as the smallest of a few encodings:
//!
//! | encoding | payload | decoding |
//! | --- | --- | --- |
//! | [`Encoding::Zero`] | none | page := zeros |
//! | [`Encoding::XorRle`] | zero-run coded XOR against the backup's copy | page ^= delta |
//! | [`Encoding::XorLz4`] | LZ4 block of the XOR against the backup's copy | page ^= delta |
//! | [`Encoding::Rle`] | zero-run coded page | page := zeros, then the literals |
//! | [`Encoding::Lz4`] | LZ4 block of the page | page := payload |
//! | [`Encoding::Raw`] | the 4096 bytes | page := payload |
//!
//! The XOR encodings need a *base*: the content the backup already holds for that page,
//! which the primary remembers in a [`DeltaCache`](crate::delta_cache::DeltaCache). They
//! decode onto the backup's committed copy of the page.
//!
//! Zero-run format (`XorRle`): a sequence of tokens `skip: varint, len: varint, len bytes`;
//! decoding advances `skip` bytes (XOR with zero changes nothing), XORs the `len` literal
//! bytes in, and advances past them. Bytes after the last token are unchanged; an empty
//! payload means "page identical to the base". `Rle` is the same format applied to a page
//! of zeros.
//!
//! Encoding cost control: LZ4 compresses at ~0.6 GB/s (about 7 µs a page), so the encoder
//! takes a zero-run delta of at most [`SMALL_DELTA`] bytes without trying LZ4, and tries
//! LZ4 on the page itself (besides the XOR) only when the best delta so far is larger than
//! half a page. Decoding cost control: LZ4 codes a run of zeros as a match overlapping its
//! own output, which the (safe) decoder copies a byte at a time, about 4 µs for a page of
//! mostly zeros against ~0.3 µs for its zero-run coding; so a zero-run coding (of the
//! XOR, or of the page itself) of at most half a page is taken even where LZ4 would be
//! smaller. Otherwise the encoder takes the smallest candidate.
//!
//! Decoding validates everything and never panics; on error the destination page is left
//! exactly as it was.

use thiserror::Error;

use crate::PAGE_SIZE;

/// A zero-run delta this small is taken without trying LZ4.
pub const SMALL_DELTA: usize = 64;

/// Gaps of fewer zero bytes than this inside a changed stretch stay in the literal.
const MIN_GAP: usize = 4;

/// Largest LZ4 output for one page.
const LZ4_MAX: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

/// Errors from decoding a page.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// The encoding byte names no known encoding.
    #[error("unknown page encoding {0}")]
    UnknownEncoding(u8),
    /// The payload length does not fit the encoding.
    #[error("{encoding:?} page payload has {len} bytes, {expected}")]
    PayloadLength {
        /// The encoding of the page.
        encoding: Encoding,
        /// The payload length received.
        len: usize,
        /// What was expected, in words.
        expected: &'static str,
    },
    /// The LZ4 block is corrupt or does not expand to exactly one page.
    #[error("{encoding:?} page payload is not a valid LZ4 block of one page: {reason}")]
    Lz4 {
        /// The encoding of the page.
        encoding: Encoding,
        /// What LZ4 decoding said.
        reason: String,
    },
    /// The zero-run delta is corrupt.
    #[error("zero-run delta is corrupt at payload byte {offset}: {reason}")]
    ZeroRun {
        /// Offset into the payload where decoding failed.
        offset: usize,
        /// What was wrong.
        reason: &'static str,
    },
}

/// How a page is encoded on the wire (one byte).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// An all-zero page; no payload.
    Zero = 0,
    /// The page as is, 4096 bytes.
    Raw = 1,
    /// An LZ4 block of the page.
    Lz4 = 2,
    /// An LZ4 block of `page ^ base`.
    XorLz4 = 3,
    /// A zero-run coding of `page ^ base`.
    XorRle = 4,
    /// A zero-run coding of the page itself: the page is zeros but for its literals.
    /// Chosen over LZ4 for pages that are mostly zeros: LZ4 codes a zero run as a match
    /// that overlaps its own output, which the decoder copies byte by byte (~1 ns a byte,
    /// 4 µs for such a page), where this costs one clear of the page and the literals.
    Rle = 5,
}

impl Encoding {
    /// Every encoding, in wire order.
    pub const ALL: [Encoding; 6] = [
        Encoding::Zero,
        Encoding::Raw,
        Encoding::Lz4,
        Encoding::XorLz4,
        Encoding::XorRle,
        Encoding::Rle,
    ];

    /// Parses the wire byte.
    pub fn from_u8(v: u8) -> Result<Self, CodecError> {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .ok_or(CodecError::UnknownEncoding(v))
    }

    /// Whether decoding applies onto the backup's current page contents.
    pub fn is_delta(self) -> bool {
        matches!(self, Encoding::XorLz4 | Encoding::XorRle)
    }
}

/// Views a slice of exactly one page as a page array.
pub fn as_page(bytes: &[u8]) -> Option<&[u8; PAGE_SIZE]> {
    bytes.try_into().ok()
}

/// Views a mutable slice of exactly one page as a page array.
pub fn as_page_mut(bytes: &mut [u8]) -> Option<&mut [u8; PAGE_SIZE]> {
    bytes.try_into().ok()
}

/// Whether every byte of `bytes` is zero (vectorizes well).
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Encodes `page` (against `base`, the backup's copy, if known) and appends the payload to
/// `out`. Returns the encoding; the payload is everything appended to `out`.
pub fn encode_page(
    page: &[u8; PAGE_SIZE],
    base: Option<&[u8; PAGE_SIZE]>,
    out: &mut Vec<u8>,
) -> Encoding {
    if is_zero(page) {
        return Encoding::Zero;
    }
    let start = out.len();
    let mut lz4 = [0u8; LZ4_MAX];
    // Best so far: (encoding, length); payload of a delta candidate may sit in `out`.
    let mut best = (Encoding::Raw, PAGE_SIZE);
    if let Some(base) = base {
        let mut xor = [0u8; PAGE_SIZE];
        for ((x, p), b) in xor.iter_mut().zip(page.iter()).zip(base.iter()) {
            *x = p ^ b;
        }
        if let Some(n) = zero_run_encode(&xor, PAGE_SIZE - 1, out) {
            if n <= SMALL_DELTA {
                return Encoding::XorRle;
            }
            best = (Encoding::XorRle, n);
        }
        // A zero-run coding of at most half a page is kept even where LZ4 would be
        // smaller: its decoding is many times cheaper (see `Encoding::Rle`).
        if best.1 > PAGE_SIZE / 2 {
            if let Some(n) = lz4_encode(&xor, &mut lz4) {
                if n < best.1 {
                    out.truncate(start);
                    out.extend_from_slice(&lz4[..n]);
                    best = (Encoding::XorLz4, n);
                }
            }
        }
    }
    if best.1 > PAGE_SIZE / 2 {
        if let Some(n) = zero_run_encode(page, PAGE_SIZE / 2, out) {
            let from = out.len() - n;
            out.copy_within(from.., start);
            out.truncate(start + n);
            best = (Encoding::Rle, n);
        }
    }
    if best.1 > PAGE_SIZE / 2 {
        if let Some(n) = lz4_encode(page, &mut lz4) {
            if n < best.1 {
                out.truncate(start);
                out.extend_from_slice(&lz4[..n]);
                best = (Encoding::Lz4, n);
            }
        }
    }
    if best.0 == Encoding::Raw {
        out.truncate(start);
        out.extend_from_slice(page);
    }
    best.0
}

/// Decodes one page. Delta encodings apply onto `dest`, which must hold the backup's
/// current copy of the page; other encodings overwrite it. On error `dest` is unchanged.
pub fn decode_page(
    enc: Encoding,
    payload: &[u8],
    dest: &mut [u8; PAGE_SIZE],
) -> Result<(), CodecError> {
    let len_err = |expected| CodecError::PayloadLength {
        encoding: enc,
        len: payload.len(),
        expected,
    };
    match enc {
        Encoding::Zero => {
            if !payload.is_empty() {
                return Err(len_err("expected 0"));
            }
            dest.fill(0);
        }
        Encoding::Raw => {
            if payload.len() != PAGE_SIZE {
                return Err(len_err("expected 4096"));
            }
            dest.copy_from_slice(payload);
        }
        Encoding::Lz4 | Encoding::XorLz4 => {
            if payload.is_empty() || payload.len() >= PAGE_SIZE {
                return Err(len_err("expected 1 to 4095"));
            }
            let mut tmp = [0u8; PAGE_SIZE];
            let n = lz4_flex::block::decompress_into(payload, &mut tmp).map_err(|e| {
                CodecError::Lz4 {
                    encoding: enc,
                    reason: e.to_string(),
                }
            })?;
            if n != PAGE_SIZE {
                return Err(CodecError::Lz4 {
                    encoding: enc,
                    reason: format!("expands to {n} bytes"),
                });
            }
            if enc == Encoding::Lz4 {
                dest.copy_from_slice(&tmp);
            } else {
                xor_into(dest, &tmp);
            }
        }
        Encoding::XorRle | Encoding::Rle => {
            if payload.len() >= PAGE_SIZE {
                return Err(len_err("expected at most 4095"));
            }
            // Validate the whole coding first so a corrupt one leaves `dest` untouched.
            zero_run_apply(payload, None)?;
            if enc == Encoding::Rle {
                dest.fill(0);
            }
            zero_run_apply(payload, Some(dest))?;
        }
    }
    Ok(())
}

fn xor_into(dest: &mut [u8], delta: &[u8]) {
    for (d, x) in dest.iter_mut().zip(delta) {
        *d ^= x;
    }
}

fn lz4_encode(input: &[u8], buf: &mut [u8; LZ4_MAX]) -> Option<usize> {
    match lz4_flex::block::compress_into(input, buf) {
        Ok(n) if n < PAGE_SIZE => Some(n),
        _ => None,
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(payload: &[u8], pos: &mut usize) -> Result<usize, CodecError> {
    let start = *pos;
    let mut v = 0usize;
    // Two varint bytes (14 bits) cover any offset inside a page.
    for shift in [0, 7] {
        let Some(&b) = payload.get(*pos) else {
            return Err(CodecError::ZeroRun {
                offset: start,
                reason: "truncated length",
            });
        };
        *pos += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CodecError::ZeroRun {
        offset: start,
        reason: "length longer than two bytes",
    })
}

/// Zero-run codes `xor` into `out`; gives up (restoring `out`) past `limit` bytes.
fn zero_run_encode(xor: &[u8; PAGE_SIZE], limit: usize, out: &mut Vec<u8>) -> Option<usize> {
    let start = out.len();
    let mut pos = 0; // bytes of `xor` already covered
    let mut i = 0;
    while i < PAGE_SIZE {
        // Skip zeros, a word at a time where possible.
        while i + 8 <= PAGE_SIZE && xor[i..i + 8] == [0u8; 8] {
            i += 8;
        }
        while i < PAGE_SIZE && xor[i] == 0 {
            i += 1;
        }
        if i == PAGE_SIZE {
            break;
        }
        // A literal runs until MIN_GAP zeros in a row (or the end of the page).
        let lit_start = i;
        let mut lit_end = i;
        let mut zeros = 0;
        while i < PAGE_SIZE && zeros < MIN_GAP {
            if xor[i] == 0 {
                zeros += 1;
            } else {
                zeros = 0;
                lit_end = i + 1;
            }
            i += 1;
        }
        put_varint(out, lit_start - pos);
        put_varint(out, lit_end - lit_start);
        out.extend_from_slice(&xor[lit_start..lit_end]);
        pos = lit_end;
        i = lit_end;
        if out.len() - start > limit {
            out.truncate(start);
            return None;
        }
    }
    Some(out.len() - start)
}

/// Walks a zero-run delta; with `dest`, XORs it in, without, only validates it.
fn zero_run_apply(
    payload: &[u8],
    mut dest: Option<&mut [u8; PAGE_SIZE]>,
) -> Result<(), CodecError> {
    let mut p = 0;
    let mut pos = 0usize;
    while p < payload.len() {
        let token = p;
        let skip = get_varint(payload, &mut p)?;
        let len = get_varint(payload, &mut p)?;
        let end = pos + skip + len;
        if end > PAGE_SIZE {
            return Err(CodecError::ZeroRun {
                offset: token,
                reason: "run goes past the end of the page",
            });
        }
        let Some(lit) = payload.get(p..p + len) else {
            return Err(CodecError::ZeroRun {
                offset: token,
                reason: "literal goes past the end of the payload",
            });
        };
        if let Some(d) = dest.as_deref_mut() {
            xor_into(&mut d[pos + skip..end], lit);
        }
        p += len;
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(page: &[u8; PAGE_SIZE], base: Option<&[u8; PAGE_SIZE]>) -> (Encoding, usize) {
        let mut out = vec![0xAA; 3]; // encode appends: existing bytes must survive
        let enc = encode_page(page, base, &mut out);
        assert_eq!(&out[..3], &[0xAA; 3]);
        let payload = &out[3..];
        let mut dest = base.copied().unwrap_or([0x5Au8; PAGE_SIZE]);
        decode_page(enc, payload, &mut dest).unwrap();
        assert!(dest == *page, "roundtrip through {enc:?} differs");
        (enc, payload.len())
    }

    fn text_page() -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        let words = b"lockstep replicates the guest every epoch; ";
        for (i, b) in p.iter_mut().enumerate() {
            *b = words[i % words.len()];
        }
        p
    }

    fn noise_page(seed: u64) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p
    }

    #[test]
    fn each_encoding_is_chosen_where_it_is_smallest() {
        assert_eq!(roundtrip(&[0u8; PAGE_SIZE], None), (Encoding::Zero, 0));
        assert_eq!(roundtrip(&noise_page(1), None), (Encoding::Raw, PAGE_SIZE));
        let (enc, len) = roundtrip(&text_page(), None);
        assert_eq!(enc, Encoding::Lz4);
        assert!(len < 200, "text compresses: {len}");

        // A few bytes changed against a noisy base: tiny zero-run delta.
        let base = noise_page(2);
        let mut page = base;
        page[10] ^= 1;
        page[4000] ^= 0xff;
        let (enc, len) = roundtrip(&page, Some(&base));
        assert_eq!(enc, Encoding::XorRle);
        assert!(len <= 8, "two changed bytes: {len}");
        // Identical to the base: empty delta.
        assert_eq!(roundtrip(&base, Some(&base)), (Encoding::XorRle, 0));

        // A long repetitive change over a noisy base: XOR then LZ4 wins.
        let mut page = base;
        for b in page[..3000].iter_mut() {
            *b ^= 0x11;
        }
        let (enc, len) = roundtrip(&page, Some(&base));
        assert_eq!(enc, Encoding::XorLz4);
        assert!(len < 100, "{len}");

        // Everything rewritten with noise: raw even with a base.
        assert_eq!(roundtrip(&noise_page(3), Some(&base)).0, Encoding::Raw);

        // Mostly zeros, no base: the zero-run coding of the page, although LZ4 would be a
        // few bytes smaller (its zero runs decode a byte at a time). Decoded over a page
        // of other bytes (`roundtrip`'s 0x5A), which it replaces whole.
        let mut page = [0u8; PAGE_SIZE];
        page[8..16].copy_from_slice(b"lockstep");
        page[1000..1100].copy_from_slice(&noise_page(4)[..100]);
        let (enc, len) = roundtrip(&page, None);
        assert_eq!(enc, Encoding::Rle);
        assert!(len < 120, "{len}");
        // The same page against a noisy base: the page's own zero runs beat the XOR's.
        assert_eq!(roundtrip(&page, Some(&base)).0, Encoding::Rle);
        // Half a page of text and half of zeros: more than half a page of literals, LZ4.
        let mut page = text_page();
        page[PAGE_SIZE / 2..].fill(0);
        assert_eq!(roundtrip(&page, None).0, Encoding::Lz4);
    }

    #[test]
    fn encoding_byte_roundtrips_and_unknown_is_an_error() {
        for e in Encoding::ALL {
            assert_eq!(Encoding::from_u8(e as u8), Ok(e));
        }
        assert_eq!(Encoding::from_u8(6), Err(CodecError::UnknownEncoding(6)));
    }

    #[test]
    fn bad_payloads_are_errors_and_leave_dest_alone() {
        let before = noise_page(9);
        let cases: &[(Encoding, &[u8])] = &[
            (Encoding::Zero, &[0]),
            (Encoding::Raw, &[1, 2, 3]),
            (Encoding::Lz4, &[]),
            (Encoding::Lz4, &[0xff, 0xff, 0xff]),
            (Encoding::XorLz4, &[0x10, b'a']), // valid LZ4, but one byte long
            (Encoding::XorRle, &[0x80]),       // truncated varint
            (Encoding::XorRle, &[0x80, 0x80, 0x01]), // varint too long
            (Encoding::XorRle, &[0, 5, 1, 2]), // literal past payload end
            (Encoding::XorRle, &[0xff, 0x1f, 2, 1, 1]), // run past page end
            (Encoding::Rle, &[0x80]),
            (Encoding::Rle, &[0, 5, 1, 2]),
            (Encoding::Rle, &[0xff, 0x1f, 2, 1, 1]),
        ];
        for (enc, payload) in cases {
            let mut dest = before;
            let err = decode_page(*enc, payload, &mut dest);
            assert!(err.is_err(), "{enc:?} {payload:?} accepted");
            assert!(dest == before, "{enc:?} {payload:?} touched dest");
        }
        let msg = decode_page(Encoding::Raw, &[1], &mut [0; PAGE_SIZE])
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "Raw page payload has 1 bytes, expected 4096");
    }

    fn page_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(vec![0u8; PAGE_SIZE]),
            prop::collection::vec(any::<u8>(), PAGE_SIZE),
            // Low-entropy pages that compress.
            prop::collection::vec(0u8..4, PAGE_SIZE),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_pages_roundtrip(page in page_strategy()) {
            roundtrip(as_page(&page).unwrap(), None);
        }

        #[test]
        fn sparse_modifications_roundtrip(
            base in page_strategy(),
            edits in prop::collection::vec((0..PAGE_SIZE, any::<u8>(), 1usize..40), 0..24),
        ) {
            let base = *as_page(&base).unwrap();
            let mut page = base;
            for (at, v, run) in edits {
                let end = (at + run).min(PAGE_SIZE);
                page[at..end].fill(v);
            }
            let (enc, len) = roundtrip(&page, Some(&base));
            prop_assert!(len <= PAGE_SIZE);
            if enc == Encoding::Raw {
                prop_assert_eq!(len, PAGE_SIZE);
            }
        }

        #[test]
        fn corrupt_payloads_never_panic(
            page in page_strategy(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let page = *as_page(&page).unwrap();
            let base = noise_page(5);
            for b in [None, Some(&base)] {
                let mut out = Vec::new();
                encode_page(&page, b, &mut out);
                let mut corrupt = out.clone();
                if !corrupt.is_empty() {
                    for (i, v) in &flips {
                        let at = i.index(corrupt.len());
                        corrupt[at] ^= v;
                    }
                }
                for e in Encoding::ALL {
                    let mut dest = base;
                    let _ = decode_page(e, &corrupt, &mut dest);
                    if !out.is_empty() {
                        let _ = decode_page(e, &out[..cut.index(out.len())], &mut dest);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(payload in prop::collection::vec(any::<u8>(), 0..5000)) {
            for e in Encoding::ALL {
                let mut dest = [7u8; PAGE_SIZE];
                let before = dest;
                if decode_page(e, &payload, &mut dest).is_err() {
                    prop_assert!(dest == before);
                }
            }
        }
    }
}
