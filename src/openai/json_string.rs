//! Where a JSON string ends, found a 64-byte block at a time.
//!
//! A request body is mostly one or two huge strings, and a coding agent's
//! are source code: a JSON escape (`\n`, `\"`) every 26 bytes or so. A scan
//! that stops at each escape pays a mispredicted branch or two each time
//! (`bench/RESULTS.md` entry 59). Here a block is classified with bit masks
//! instead, simdjson's way, so the work per block does not depend on how
//! many escapes it holds:
//!
//! - one vector pass (`json_blocks`: AVX2 where the CPU has it, else
//!   SSE2) marks the block's backslashes, and its quotes and control bytes
//!   (either ends a string's run of plain bytes: the one well, the other
//!   with an error);
//! - carry arithmetic on the backslash mask gives the bytes that odd runs
//!   of backslashes escape, so escaped quotes are told from the one that
//!   ends the string without visiting them;
//! - the escaped bytes are checked against `"`, `n`, `t` and `r` (source
//!   code's escapes) in one more vector pass; only the others are looked at
//!   one by one.
//!
//! The contents' UTF-8 is checked once the end is found, and only where a
//! block had a byte that is not ASCII: a coding agent's context is mostly
//! ASCII, and then the body is read once instead of twice (the rest of a
//! body is ASCII by JSON's grammar, which `json_syntax` checks).
//!
//! Anything wrong in a block (a control byte, a bad escape) is handed to
//! the byte-at-a-time scan from the block's start. It is the definition of
//! what is accepted and where an error is, so the errors are the same
//! whichever path finds them; it also reads the last bytes, fewer than a
//! block. What it accepts is what serde_json accepts when it skips a
//! string: no raw control bytes, escapes from JSON's list, `\u` with four
//! hex digits (surrogates are not paired: serde_json does not pair them in
//! strings it skips), and the contents valid UTF-8.

#[cfg(target_arch = "x86_64")]
use super::json_blocks::Avx2;
use super::json_blocks::{Baseline, Block, BlockReader, BLOCK};
use super::json_syntax::SyntaxError;

/// Where the string whose contents start at `at` (just after its opening
/// quote) ends: the index after its closing quote.
pub fn string_end(text: &[u8], at: usize) -> Result<usize, SyntaxError> {
    let (end, non_ascii) = unchecked_string_end_here(text, at)?;
    // The contents lie between two quotes, so they start and end on
    // character boundaries: valid alone exactly when valid in the body.
    let contents = &text[at..end - 1];
    if non_ascii && simdutf8::basic::from_utf8(contents).is_err() {
        // std says where; simdutf8's fast flavour only says whether.
        let valid_up_to = std::str::from_utf8(contents)
            .err()
            .map_or(0, |e| e.valid_up_to());
        return Err(SyntaxError::new(
            "invalid UTF-8 in a string",
            at + valid_up_to,
        ));
    }
    Ok(end)
}

/// `unchecked_string_end` with the best reader this CPU has.
fn unchecked_string_end_here(text: &[u8], at: usize) -> Result<(usize, bool), SyntaxError> {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = Avx2::detect() {
        // SAFETY: a value of `Avx2` exists only where the CPU has AVX2.
        return unsafe { unchecked_string_end_avx2(avx2, text, at) };
    }
    unchecked_string_end(Baseline {}, text, at)
}

/// The scan compiled with AVX2 enabled, so that the reader's steps inline
/// into its loop (a function without AVX2 cannot inline them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn unchecked_string_end_avx2(
    avx2: Avx2,
    text: &[u8],
    at: usize,
) -> Result<(usize, bool), SyntaxError> {
    unchecked_string_end(avx2, text, at)
}

/// The string's end, and whether a byte of it (or of the block it ends
/// in) is not ASCII; its UTF-8 is not checked.
#[inline(always)]
fn unchecked_string_end(
    reader: impl BlockReader,
    text: &[u8],
    mut at: usize,
) -> Result<(usize, bool), SyntaxError> {
    // Whether the byte at `at` is escaped by a backslash run that ended
    // the previous block.
    let mut carry = false;
    let mut non_ascii = false;
    while let Some(block) = text.get(at..).and_then(<[u8]>::first_chunk::<BLOCK>) {
        let masks = reader.masks(block);
        non_ascii |= masks.non_ascii;
        if masks.ends | masks.backslashes == 0 && !carry {
            at += BLOCK;
            continue;
        }
        let first_escaped = carry;
        let escaped = escaped_bytes(masks.backslashes, &mut carry);
        let ends = masks.ends & !escaped;
        // The bits below the first end: the string's part of the block.
        let inside = ends.wrapping_sub(1) & !ends;
        let valid = escapes_are_valid(reader, text, at, block, escaped & inside);
        if valid && ends == 0 {
            at += BLOCK;
            continue;
        }
        let end = at + ends.trailing_zeros() as usize;
        if valid && text[end] == b'"' {
            return Ok((end + 1, non_ascii));
        }
        // A control byte or a bad escape: the byte-at-a-time scan says
        // which and where, from the block's start (or from the backslash
        // that escapes its first byte). Were it to find an end instead,
        // the contents would be checked as if not ASCII.
        return string_end_bytewise(text, at - usize::from(first_escaped)).map(|end| (end, true));
    }
    let from = at - usize::from(carry);
    let end = string_end_bytewise(text, from)?;
    Ok((end, non_ascii || !text[from..end].is_ascii()))
}

/// The byte-at-a-time scan: the definition of a string's end and errors.
fn string_end_bytewise(text: &[u8], mut at: usize) -> Result<usize, SyntaxError> {
    while let Some(&byte) = text.get(at) {
        match byte {
            b'"' => return Ok(at + 1),
            b'\\' => at = escape_end(text, at)?,
            0..=0x1f => return Err(SyntaxError::new("control character in a string", at)),
            _ => at += 1,
        }
    }
    Err(SyntaxError::new("unexpected end in a string", at))
}

/// The escape at `at` (a backslash): where it ends.
fn escape_end(text: &[u8], at: usize) -> Result<usize, SyntaxError> {
    match text.get(at + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(at + 2),
        Some(b'u') => match text.get(at + 2..at + 6) {
            Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => Ok(at + 6),
            Some(_) => Err(SyntaxError::new("invalid \\u escape", at)),
            None => Err(SyntaxError::new("unexpected end in a string", text.len())),
        },
        Some(_) => Err(SyntaxError::new("invalid escape", at)),
        None => Err(SyntaxError::new("unexpected end in a string", text.len())),
    }
}

/// Whether every escaped byte in `escaped` (bits of the block at `at`) is
/// a valid escape. A `\u`'s hex digits may run into the next block: they
/// are read from `text`, and they are never special bytes there.
#[inline(always)]
fn escapes_are_valid(
    reader: impl BlockReader,
    text: &[u8],
    at: usize,
    block: &Block,
    escaped: u64,
) -> bool {
    if escaped == 0 {
        return true;
    }
    let mut rare = escaped & !reader.common_escapes(block);
    while rare != 0 {
        let backslash = at + rare.trailing_zeros() as usize - 1;
        if escape_end(text, backslash).is_err() {
            return false;
        }
        rare &= rare - 1;
    }
    true
}

/// The bits of the bytes escaped by the block's backslash runs: the byte
/// after each run of odd length. `carry` says on entry whether the
/// block's first byte is escaped (by a run that ended the previous block),
/// and on return whether the next block's is.
///
/// Adding a run's first bit to the mask carries through the run and lands
/// just after it; the run's length is odd when that bit's position and the
/// start's differ in parity. Runs starting on even and on odd positions are
/// added separately so that each keeps its own parity.
fn escaped_bytes(backslashes: u64, carry: &mut bool) -> u64 {
    const EVEN: u64 = 0x5555_5555_5555_5555;
    const ODD: u64 = !EVEN;
    let escaped_first = u64::from(*carry);
    // An escaped backslash starts no escape.
    let backslashes = backslashes & !escaped_first;
    let starts = backslashes & !(backslashes << 1);
    let (after_even, _) = backslashes.overflowing_add(starts & EVEN);
    let (after_odd, odd_run_ends_the_block) = backslashes.overflowing_add(starts & ODD);
    // A run from an odd start to the block's end has an odd length (64 is
    // even); one from an even start has an even length and escapes nothing.
    *carry = odd_run_ends_the_block;
    ((after_even & ODD) | (after_odd & EVEN)) & !backslashes | escaped_first
}

#[cfg(test)]
mod tests {
    use super::super::json_blocks::{tests::Random, Bytewise};
    use super::*;

    /// The escaped bytes by definition: walk the block, a backslash that is
    /// not itself escaped escapes the next byte.
    fn escaped_bytes_walked(backslashes: u64, carry: bool) -> (u64, bool) {
        let (mut escaped, mut pending) = (0, carry);
        for i in 0..64 {
            if pending {
                escaped |= 1 << i;
                pending = false;
            } else if backslashes >> i & 1 == 1 {
                pending = true;
            }
        }
        // The escaped backslashes are not asked for, but a carried-in one is.
        (escaped & !backslashes | u64::from(carry), pending)
    }

    #[test]
    fn escaped_bytes_are_those_after_odd_runs() {
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let mut masks = vec![
            0,
            u64::MAX,
            u64::MAX << 1,
            1 << 63,
            3 << 62,
            0x5555_5555_5555_5555,
        ];
        masks.push(!masks[5]);
        for i in 0..200_000 {
            let r = random.next();
            // Dense, sparse and middling runs of backslashes.
            masks.push(match i % 3 {
                0 => r,
                1 => r & random.next() & random.next(),
                _ => r | random.next(),
            });
        }
        for &backslashes in &masks {
            for carry_in in [false, true] {
                let mut carry = carry_in;
                let escaped = escaped_bytes(backslashes, &mut carry);
                assert_eq!(
                    (escaped, carry),
                    escaped_bytes_walked(backslashes, carry_in),
                    "backslashes {backslashes:064b}, carry {carry_in}"
                );
            }
        }
    }

    #[test]
    fn every_position_in_a_block_is_seen() {
        // A quote, an escape or a control byte at each offset of the first
        // two blocks, and escapes that straddle a block's end.
        for at in 0..130 {
            let mut text = vec![b'a'; 200];
            text[at] = b'"';
            assert_eq!(string_end(&text, 0), Ok(at + 1), "quote at {at}");
            text[at] = 0x1f;
            assert_eq!(string_end(&text, 0).unwrap_err().at, at, "control at {at}");
            text[at] = b'\\';
            text[at + 1] = b'u';
            text[at + 2..at + 6].copy_from_slice(b"00e9");
            text[at + 6] = b'"';
            assert_eq!(string_end(&text, 0), Ok(at + 7), "escape at {at}");
            text[at + 1] = b'"';
            text[at + 2] = b'"';
            assert_eq!(string_end(&text, 0), Ok(at + 3), "escaped quote at {at}");
            text[at + 1] = b'x';
            assert_eq!(
                string_end(&text, 0).unwrap_err().at,
                at,
                "bad escape at {at}"
            );
        }
    }

    /// Random strings rich in what matters (quotes, runs of backslashes,
    /// every escape, bad escapes, control bytes) across one to four
    /// blocks: the block scan agrees with the byte-at-a-time one on the end
    /// and on every error, what and where.
    #[test]
    fn the_block_scan_agrees_with_the_bytewise_one() {
        let escape_material: &[u8] = b"\\\\\\\\\"nrtbf/u0aF";
        let mut random = Random(0x2545_f491_4f6c_dd1d);
        let (mut accepted, mut past_a_block, mut refused) = (0, 0, 0);
        for case in 0..300_000 {
            let len = (random.next() % 260) as usize;
            let one_in = 1 + random.next() % 40;
            let text: Vec<u8> = (0..len)
                .map(|_| {
                    let r = random.next();
                    let pick = |from: &[u8]| from[(r >> 32) as usize % from.len()];
                    match r % 1000 {
                        0..=3 => b'"',
                        4 => pick(b"\x01\x1f\n"),
                        _ if r.is_multiple_of(one_in) => pick(escape_material),
                        _ => pick(b"abyz09 "),
                    }
                })
                .collect();
            let from = (case % 3).min(len);
            let bytewise = string_end_bytewise(&text, from);
            let context = format!("{:?} from {from}", String::from_utf8_lossy(&text));
            assert_eq!(string_end(&text, from), bytewise, "{context}");
            // Each reader's scan, not only the one this CPU picks (the
            // text is ASCII, so the UTF-8 check has nothing to add).
            let unchecked = bytewise.clone().map(|end| (end, false));
            let unchecked_end =
                |result: Result<(usize, bool), SyntaxError>| result.map(|(end, _)| (end, false));
            assert_eq!(
                unchecked_end(unchecked_string_end(Bytewise, &text, from)),
                unchecked,
                "bytewise masks: {context}"
            );
            assert_eq!(
                unchecked_end(unchecked_string_end(Baseline {}, &text, from)),
                unchecked,
                "baseline masks: {context}"
            );
            #[cfg(target_arch = "x86_64")]
            if let Some(avx2) = Avx2::detect() {
                assert_eq!(
                    unchecked_end(unchecked_string_end(avx2, &text, from)),
                    unchecked,
                    "AVX2 masks: {context}"
                );
            }
            if let Ok(end) = bytewise {
                accepted += 1;
                past_a_block += usize::from(end > from + BLOCK);
            } else {
                refused += 1;
            }
        }
        // Both answers were well represented, and strings that end past
        // their first block.
        assert!(
            accepted > 30_000 && past_a_block > 10_000 && refused > 30_000,
            "{accepted} accepted ({past_a_block} past a block), {refused} refused"
        );
    }

    /// A string's contents must be UTF-8, wherever the scan meets them: in
    /// a block, across blocks, in the last bytes; what follows the string
    /// is not its business.
    #[test]
    fn contents_must_be_utf8() {
        for at in [0, 1, 30, 62, 63, 64, 65, 127, 128, 150] {
            // Two-byte characters from an odd offset when `at` is odd: one
            // of them straddles the first block's end once `at` passes 64.
            let mut text = format!("{}{}", "a".repeat(at % 2), "é".repeat(at / 2)).into_bytes();
            text.extend_from_slice("x€y\"".as_bytes());
            let end = text.len();
            text.extend_from_slice(b"\xff\xfe");
            assert_eq!(string_end(&text, 0), Ok(end), "valid up to {at}");
            // An invalid byte inside.
            let mut bad = text.clone();
            bad.insert(at, 0xc3);
            bad.insert(at + 1, b'(');
            let error = string_end(&bad, 0).unwrap_err();
            assert_eq!(
                (error.what, error.at),
                ("invalid UTF-8 in a string", at),
                "invalid at {at}"
            );
            // A character cut short by the closing quote.
            let mut cut = "a".repeat(at).into_bytes();
            cut.extend_from_slice(&"€".as_bytes()[..2]);
            cut.push(b'"');
            assert_eq!(string_end(&cut, 0).unwrap_err().at, at, "cut at {at}");
        }
    }
}
