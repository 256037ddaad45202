//! A 64-byte block of JSON text as bit masks (bit i for byte i): what the
//! string scan (`json_string`) needs to know of a block without looking at
//! its bytes one by one.
//!
//! Three readers give the same masks:
//! - AVX2, two 32-byte lanes per block, used where the CPU has it. A build
//!   for x86_64 cannot assume it, so it is checked at run time, once per
//!   string (std caches the answer), and only a value of [`Avx2`], which
//!   exists only after that check, can use it.
//! - SSE2, four 16-byte lanes: part of x86_64 itself, the fallback there.
//! - A byte at a time ([`Bytewise`]): other architectures, and the tests'
//!   definition of the masks.
//!
//! A reader is a zero-sized `Copy` value handed to the scan, which is
//! compiled once per reader: the AVX2 instance is compiled with AVX2 enabled
//! (`json_string`), so that every step of its loop inlines.

/// The bytes read at once.
pub const BLOCK: usize = 64;

/// One block of text.
pub type Block = [u8; BLOCK];

/// A block's bit masks (bit i for byte i).
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMasks {
    /// Quotes and control bytes: either ends a string's run of plain
    /// bytes (the one well, the other with an error).
    pub ends: u64,
    pub backslashes: u64,
    /// Whether any byte is not ASCII (its UTF-8 is then checked).
    pub non_ascii: bool,
}

/// A way of computing a block's masks.
pub trait BlockReader: Copy {
    fn masks(self, block: &Block) -> BlockMasks;

    /// The bits of the block's `"`, `n`, `t` and `r`: the bytes that
    /// source code's escapes (`\"`, `\n`, `\t`, `\r`) escape.
    fn common_escapes(self, block: &Block) -> u64;
}

// The byte-at-a-time reader: built where it is the baseline, and for the
// tests, which define the other readers' masks by it.
#[cfg(any(test, not(target_arch = "x86_64")))]
pub use bytewise::Bytewise;

#[cfg(any(test, not(target_arch = "x86_64")))]
mod bytewise {
    use super::{Block, BlockMasks, BlockReader};

    /// The masks a byte at a time.
    #[derive(Debug, Clone, Copy)]
    pub struct Bytewise;

    impl BlockReader for Bytewise {
        fn masks(self, block: &Block) -> BlockMasks {
            BlockMasks {
                ends: bytes_where(block, |byte| matches!(byte, b'"' | 0..=0x1f)),
                backslashes: bytes_where(block, |byte| byte == b'\\'),
                non_ascii: !block.is_ascii(),
            }
        }

        fn common_escapes(self, block: &Block) -> u64 {
            bytes_where(block, |byte| matches!(byte, b'"' | b'n' | b't' | b'r'))
        }
    }

    fn bytes_where(block: &Block, test: impl Fn(u8) -> bool) -> u64 {
        block
            .iter()
            .enumerate()
            .fold(0, |mask, (i, &byte)| mask | u64::from(test(byte)) << i)
    }
}

/// The reader every CPU of the build's architecture has.
#[cfg(target_arch = "x86_64")]
pub type Baseline = x86::Sse2;
#[cfg(not(target_arch = "x86_64"))]
pub type Baseline = Bytewise;

#[cfg(target_arch = "x86_64")]
pub use x86::Avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Block, BlockMasks, BlockReader};
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_min_epu8,
        _mm256_movemask_epi8, _mm256_or_si256, _mm256_set1_epi8, _mm_cmpeq_epi8, _mm_loadu_si128,
        _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8, _mm_setzero_si128,
    };

    /// SSE2: part of x86_64 itself, so always there.
    #[derive(Debug, Clone, Copy)]
    pub struct Sse2;

    impl BlockReader for Sse2 {
        #[inline(always)]
        fn masks(self, block: &Block) -> BlockMasks {
            // SAFETY: SSE2 is part of x86_64 (every x86_64 CPU has these
            // instructions), and each load reads 16 of the block's 64
            // bytes, with no alignment requirement.
            unsafe {
                let quote = _mm_set1_epi8(b'"' as i8);
                let backslash = _mm_set1_epi8(b'\\' as i8);
                let last_control = _mm_set1_epi8(0x1f);
                let mut ends = [_mm_setzero_si128(); 4];
                let mut backslashes = [_mm_setzero_si128(); 4];
                let mut any = _mm_setzero_si128();
                let mut high_bits = _mm_setzero_si128();
                for (i, lane) in block.chunks_exact(16).enumerate() {
                    let bytes = _mm_loadu_si128(lane.as_ptr().cast::<__m128i>());
                    // A byte is a control character where min(byte, 0x1f) == byte.
                    let control = _mm_cmpeq_epi8(_mm_min_epu8(bytes, last_control), bytes);
                    ends[i] = _mm_or_si128(_mm_cmpeq_epi8(bytes, quote), control);
                    backslashes[i] = _mm_cmpeq_epi8(bytes, backslash);
                    any = _mm_or_si128(any, _mm_or_si128(ends[i], backslashes[i]));
                    high_bits = _mm_or_si128(high_bits, bytes);
                }
                let non_ascii = _mm_movemask_epi8(high_bits) != 0;
                // Most of plain text's blocks: nothing to merge.
                if _mm_movemask_epi8(any) == 0 {
                    return BlockMasks {
                        non_ascii,
                        ..BlockMasks::default()
                    };
                }
                let bits = |lanes: [__m128i; 4]| {
                    lanes.iter().enumerate().fold(0, |mask, (i, &lane)| {
                        mask | u64::from(_mm_movemask_epi8(lane) as u16) << (16 * i)
                    })
                };
                BlockMasks {
                    ends: bits(ends),
                    backslashes: bits(backslashes),
                    non_ascii,
                }
            }
        }

        #[inline(always)]
        fn common_escapes(self, block: &Block) -> u64 {
            let mut mask = 0;
            // SAFETY: as in `masks`: SSE2 only, unaligned 16-byte loads
            // within the block.
            unsafe {
                let [quote, n, t, r] =
                    [b'"', b'n', b't', b'r'].map(|byte| _mm_set1_epi8(byte as i8));
                for (i, lane) in block.chunks_exact(16).enumerate() {
                    let bytes = _mm_loadu_si128(lane.as_ptr().cast::<__m128i>());
                    let common = _mm_or_si128(
                        _mm_or_si128(_mm_cmpeq_epi8(bytes, quote), _mm_cmpeq_epi8(bytes, n)),
                        _mm_or_si128(_mm_cmpeq_epi8(bytes, t), _mm_cmpeq_epi8(bytes, r)),
                    );
                    mask |= u64::from(_mm_movemask_epi8(common) as u16) << (16 * i);
                }
            }
            mask
        }
    }

    /// AVX2: a value exists only where the CPU has it.
    #[derive(Debug, Clone, Copy)]
    pub struct Avx2(());

    impl Avx2 {
        /// The reader, if this CPU has AVX2.
        #[inline]
        pub fn detect() -> Option<Self> {
            std::arch::is_x86_feature_detected!("avx2").then_some(Self(()))
        }
    }

    impl BlockReader for Avx2 {
        #[inline(always)]
        fn masks(self, block: &Block) -> BlockMasks {
            // SAFETY: a value of `Avx2` exists only where the CPU has AVX2
            // (`detect`).
            unsafe { masks_avx2(block) }
        }

        #[inline(always)]
        fn common_escapes(self, block: &Block) -> u64 {
            // SAFETY: as in `masks`.
            unsafe { common_escapes_avx2(block) }
        }
    }

    /// The two 32-byte halves of a block.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn halves(block: &Block) -> [__m256i; 2] {
        // SAFETY: each load reads 32 of the block's 64 bytes, with no
        // alignment requirement.
        unsafe {
            [
                _mm256_loadu_si256(block.as_ptr().cast::<__m256i>()),
                _mm256_loadu_si256(block[32..].as_ptr().cast::<__m256i>()),
            ]
        }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn bits(halves: [__m256i; 2]) -> u64 {
        u64::from(_mm256_movemask_epi8(halves[0]) as u32)
            | u64::from(_mm256_movemask_epi8(halves[1]) as u32) << 32
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn masks_avx2(block: &Block) -> BlockMasks {
        let quote = _mm256_set1_epi8(b'"' as i8);
        let backslash = _mm256_set1_epi8(b'\\' as i8);
        let last_control = _mm256_set1_epi8(0x1f);
        let bytes = halves(block);
        let ends = bytes.map(|half| {
            let control = _mm256_cmpeq_epi8(_mm256_min_epu8(half, last_control), half);
            _mm256_or_si256(_mm256_cmpeq_epi8(half, quote), control)
        });
        BlockMasks {
            ends: bits(ends),
            backslashes: bits(bytes.map(|half| _mm256_cmpeq_epi8(half, backslash))),
            non_ascii: _mm256_movemask_epi8(_mm256_or_si256(bytes[0], bytes[1])) != 0,
        }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn common_escapes_avx2(block: &Block) -> u64 {
        let [quote, n, t, r] = [b'"', b'n', b't', b'r'].map(|byte| _mm256_set1_epi8(byte as i8));
        bits(halves(block).map(|half| {
            _mm256_or_si256(
                _mm256_or_si256(_mm256_cmpeq_epi8(half, quote), _mm256_cmpeq_epi8(half, n)),
                _mm256_or_si256(_mm256_cmpeq_epi8(half, t), _mm256_cmpeq_epi8(half, r)),
            )
        }))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64), for reproducible
    /// random cases (the string scan's tests use it too).
    pub(in super::super) struct Random(pub(in super::super) u64);

    impl Random {
        pub(in super::super) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Where the CPU says it has AVX2 (Linux's `/proc/cpuinfo`), the AVX2
    /// reader exists: otherwise its tests below, and the gateway's use of
    /// it, would be skipped without a word.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn the_avx2_reader_exists_where_the_cpu_has_avx2() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let listed = cpuinfo
            .lines()
            .filter(|line| line.starts_with("flags"))
            .any(|line| line.split_whitespace().any(|flag| flag == "avx2"));
        assert_eq!(Avx2::detect().is_some(), listed);
    }

    /// Every reader this machine can run, against the byte-at-a-time one
    /// and against the masks' definition, with each byte value at each
    /// position. (AVX2 is checked where the CPU has it: the machines this
    /// project runs on do.)
    #[test]
    fn the_readers_agree_on_every_byte_at_every_position() {
        for byte in 0..=u8::MAX {
            for at in 0..BLOCK {
                let mut block = [b'a'; BLOCK];
                block[at] = byte;
                let expected = BlockMasks {
                    ends: u64::from(matches!(byte, b'"' | 0..=0x1f)) << at,
                    backslashes: u64::from(byte == b'\\') << at,
                    non_ascii: byte >= 0x80,
                };
                let common = u64::from(matches!(byte, b'"' | b'n' | b't' | b'r')) << at;
                let context = format!("byte {byte:#04x} at {at}");
                assert_eq!(Bytewise.masks(&block), expected, "{context}");
                assert_eq!(Bytewise.common_escapes(&block), common, "{context}");
                assert_eq!(Baseline {}.masks(&block), expected, "{context}");
                assert_eq!(Baseline {}.common_escapes(&block), common, "{context}");
                #[cfg(target_arch = "x86_64")]
                if let Some(avx2) = Avx2::detect() {
                    assert_eq!(avx2.masks(&block), expected, "AVX2, {context}");
                    assert_eq!(avx2.common_escapes(&block), common, "AVX2, {context}");
                }
            }
        }
    }

    /// Blocks with many special bytes at once, where lanes' masks must be
    /// merged in the right places.
    #[test]
    fn the_readers_agree_on_busy_blocks() {
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let material = b"\"\\ntr\x00\x1f\x7f\x80\xffaz ";
        for _ in 0..20_000 {
            let mut block = [0; BLOCK];
            for byte in &mut block {
                *byte = material[(random.next() >> 40) as usize % material.len()];
            }
            let expected = (Bytewise.masks(&block), Bytewise.common_escapes(&block));
            assert_eq!(
                (
                    Baseline {}.masks(&block),
                    Baseline {}.common_escapes(&block)
                ),
                expected
            );
            #[cfg(target_arch = "x86_64")]
            if let Some(avx2) = Avx2::detect() {
                assert_eq!((avx2.masks(&block), avx2.common_escapes(&block)), expected);
            }
        }
    }
}
