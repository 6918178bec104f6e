//! What the NCCL transport sends besides tensor data: a fixed-size message header, and the blob
//! of NCCL unique ids the ranks share at start-up.
//!
//! NCCL moves raw device buffers of a size both sides must already know, so every message is a
//! [`HEADER_LEN`]-byte header (operation, sequence number, sender, dtype, shape) followed by the
//! tensor's elements, whose length the receiver computes from the header. The header is checked
//! before anything is allocated: a corrupt or foreign header is an error naming what is wrong,
//! never a huge allocation or a panic.
//!
//! This module needs no GPU and is compiled in every build, so its tests run in CI; the transport
//! itself is `crate::nccl` (feature `nccl`).

use candle_core::DType;

use crate::Op;

/// Bytes of every header, whatever the tensor.
pub const HEADER_LEN: usize = 96;

/// At most this many dimensions travel in a header.
pub const MAX_DIMS: usize = 8;

/// At most this many ranks in an NCCL group (the CLI's own limit on ranks is 64 too): bounds the
/// unique-id blob ([`ids_len`]) and the ranks a header may name.
pub const MAX_WORLD: usize = 64;

/// Bytes of one NCCL unique id (`ncclUniqueId`, 128 bytes in every NCCL 2.x).
pub const UNIQUE_ID_LEN: usize = 128;

/// Default bound on one message's tensor data: 16 GiB, far above any latent or activation this
/// project sends, far below what would make a corrupt header exhaust a GPU's memory.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 30;

const MAGIC: [u8; 4] = *b"HDNC";
const VERSION: u8 = 1;

/// Why a header or id blob was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("a message header must be {HEADER_LEN} bytes, got {0}")]
    Length(usize),
    #[error(
        "a message header does not start with hybridiff's NCCL magic (got {0:02x?}): the peer \
         is not a hybridiff rank of the same job, or the stream is out of step"
    )]
    Magic([u8; 4]),
    #[error("header format version {got}, this build speaks {VERSION}: run the same hybridiff on every rank")]
    Version { got: u8 },
    #[error("unknown operation code {0} in a message header")]
    OpCode(u8),
    #[error("unknown dtype code {0} in a message header")]
    DTypeCode(u8),
    #[error("a tensor of dtype {0:?} cannot be sent over NCCL by hybridiff")]
    UnsupportedDType(DType),
    #[error("a header from rank {src} of a group of {world}; expected rank {expected} of {expected_world}")]
    Sender {
        src: usize,
        world: usize,
        expected: usize,
        expected_world: usize,
    },
    #[error("a tensor with {0} dimensions; at most {MAX_DIMS} travel in a header")]
    TooManyDims(usize),
    #[error(
        "a tensor of shape {dims:?} and dtype {dtype:?} is over the {max_bytes}-byte bound on \
         one message (or its size overflows)"
    )]
    TooLarge {
        dims: Vec<u64>,
        dtype: DType,
        max_bytes: u64,
    },
    #[error("a message header flags its tensor with {0}; expected 0 or 1")]
    Flag(u8),
    #[error("an NCCL group of {0} ranks; between 1 and {MAX_WORLD} are supported")]
    World(usize),
    #[error("the NCCL unique-id blob has {got} bytes; a group of {world} ranks needs {expected}")]
    IdsLength {
        got: usize,
        world: usize,
        expected: usize,
    },
}

/// One message's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub op: Op,
    /// The sender's collective sequence number (0 for point-to-point).
    pub seq: u64,
    /// The sending rank.
    pub src: usize,
    /// The group's size, as the sender sees it.
    pub world: usize,
    /// The tensor that follows, if any: its dtype and shape (row-major, contiguous).
    pub tensor: Option<(DType, Vec<usize>)>,
}

impl Header {
    /// Bytes of tensor data that follow this header.
    pub fn data_bytes(&self) -> u64 {
        match &self.tensor {
            None => 0,
            Some((dtype, dims)) => dims.iter().fold(dtype.size_in_bytes() as u64, |a, &d| {
                a.saturating_mul(d as u64)
            }),
        }
    }

    /// The header's [`HEADER_LEN`] bytes.
    ///
    /// # Errors
    /// A dtype the transport does not carry, more than [`MAX_DIMS`] dimensions, or a rank or
    /// world size out of range: what [`decode`](Self::decode) would refuse.
    pub fn encode(&self) -> Result<[u8; HEADER_LEN], WireError> {
        check_world(self.world)?;
        if self.src >= self.world {
            return Err(WireError::Sender {
                src: self.src,
                world: self.world,
                expected: self.src,
                expected_world: self.world,
            });
        }
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = op_code(self.op);
        out[8..12].copy_from_slice(&(self.src as u32).to_le_bytes());
        out[12..16].copy_from_slice(&(self.world as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        if let Some((dtype, dims)) = &self.tensor {
            if dims.len() > MAX_DIMS {
                return Err(WireError::TooManyDims(dims.len()));
            }
            out[6] = 1;
            out[7] = dtype_code(*dtype)?;
            out[24] = dims.len() as u8;
            for (i, &d) in dims.iter().enumerate() {
                out[32 + 8 * i..40 + 8 * i].copy_from_slice(&(d as u64).to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Reads a header sent by rank `expect_src` of a group of `world` ranks, refusing one whose
    /// tensor would be over `max_bytes` bytes.
    ///
    /// # Errors
    /// [`WireError`] naming what is wrong: length, magic, version, codes, sender, dimensions or
    /// size. Nothing is allocated from the header's numbers before they are checked.
    pub fn decode(
        bytes: &[u8],
        expect_src: usize,
        world: usize,
        max_bytes: u64,
    ) -> Result<Header, WireError> {
        let bytes: &[u8; HEADER_LEN] = bytes
            .try_into()
            .map_err(|_| WireError::Length(bytes.len()))?;
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        if bytes[4] != VERSION {
            return Err(WireError::Version { got: bytes[4] });
        }
        let op = op_from_code(bytes[5]).ok_or(WireError::OpCode(bytes[5]))?;
        let src = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let sent_world = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        if src != expect_src || sent_world != world {
            return Err(WireError::Sender {
                src,
                world: sent_world,
                expected: expect_src,
                expected_world: world,
            });
        }
        let seq = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let tensor = match bytes[6] {
            0 => None,
            1 => {
                let dtype = dtype_from_code(bytes[7]).ok_or(WireError::DTypeCode(bytes[7]))?;
                let ndim = bytes[24] as usize;
                if ndim > MAX_DIMS {
                    return Err(WireError::TooManyDims(ndim));
                }
                let raw: Vec<u64> = (0..ndim)
                    .map(|i| {
                        u64::from_le_bytes(bytes[32 + 8 * i..40 + 8 * i].try_into().expect("8"))
                    })
                    .collect();
                let size = raw
                    .iter()
                    .try_fold(dtype.size_in_bytes() as u64, |a, &d| a.checked_mul(d));
                match size {
                    Some(s) if s <= max_bytes => {}
                    _ => {
                        return Err(WireError::TooLarge {
                            dims: raw,
                            dtype,
                            max_bytes,
                        })
                    }
                }
                // Each dimension fits in usize: their product (times the dtype size) does.
                Some((dtype, raw.into_iter().map(|d| d as usize).collect()))
            }
            other => return Err(WireError::Flag(other)),
        };
        Ok(Header {
            op,
            seq,
            src,
            world,
            tensor,
        })
    }
}

fn check_world(world: usize) -> Result<(), WireError> {
    if world == 0 || world > MAX_WORLD {
        return Err(WireError::World(world));
    }
    Ok(())
}

/// Message streams per ordered pair of ranks: point-to-point and collective messages travel
/// apart, so a point-to-point tensor nobody received yet can never be taken for a collective's.
pub const CHANNELS: usize = 2;

/// The NCCL transport runs one two-rank communicator per ordered pair of ranks (sender,
/// receiver) and [`CHANNELS`] stream, so a send never waits behind a receive. This is the index
/// of channel `channel` of pair `src -> dst` among the `CHANNELS * world * (world - 1)` of them,
/// in the unique-id blob.
pub fn pair_index(channel: usize, src: usize, dst: usize, world: usize) -> usize {
    debug_assert!(channel < CHANNELS && src != dst && src < world && dst < world);
    channel * world * (world - 1) + src * (world - 1) + if dst > src { dst - 1 } else { dst }
}

/// Bytes of the unique-id blob of a group of `world` ranks: one id per channel of each ordered
/// pair.
///
/// # Errors
/// [`WireError::World`] outside `1..=MAX_WORLD`.
pub fn ids_len(world: usize) -> Result<usize, WireError> {
    check_world(world)?;
    Ok(CHANNELS * world * (world - 1) * UNIQUE_ID_LEN)
}

/// Splits the blob rank 0 broadcast into its ids (indexed by [`pair_index`]), checking its
/// length against the world size.
///
/// # Errors
/// [`WireError::World`] or [`WireError::IdsLength`].
pub fn split_ids(blob: &[u8], world: usize) -> Result<Vec<[u8; UNIQUE_ID_LEN]>, WireError> {
    let expected = ids_len(world)?;
    if blob.len() != expected {
        return Err(WireError::IdsLength {
            got: blob.len(),
            world,
            expected,
        });
    }
    Ok(blob
        .chunks_exact(UNIQUE_ID_LEN)
        .map(|c| c.try_into().expect("chunk of UNIQUE_ID_LEN"))
        .collect())
}

fn op_code(op: Op) -> u8 {
    match op {
        Op::Send => 0,
        Op::Recv => 1,
        Op::Broadcast => 2,
        Op::AllGather => 3,
        Op::Barrier => 4,
    }
}

fn op_from_code(c: u8) -> Option<Op> {
    Some(match c {
        0 => Op::Send,
        1 => Op::Recv,
        2 => Op::Broadcast,
        3 => Op::AllGather,
        4 => Op::Barrier,
        _ => return None,
    })
}

/// The dtypes the transport carries: those candle's CUDA backend stores.
const DTYPES: [DType; 9] = [
    DType::U8,
    DType::U32,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F16,
    DType::BF16,
    DType::F32,
    DType::F64,
];

fn dtype_code(d: DType) -> Result<u8, WireError> {
    DTYPES
        .iter()
        .position(|&x| x == d)
        .map(|i| i as u8 + 1)
        .ok_or(WireError::UnsupportedDType(d))
}

fn dtype_from_code(c: u8) -> Option<DType> {
    DTYPES.get((c as usize).checked_sub(1)?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(dtype: DType, dims: &[usize]) -> Header {
        Header {
            op: Op::AllGather,
            seq: 41,
            src: 2,
            world: 4,
            tensor: Some((dtype, dims.to_vec())),
        }
    }

    #[test]
    fn headers_round_trip_every_dtype_and_rank() {
        for dtype in DTYPES {
            for dims in [
                &[][..],
                &[1][..],
                &[2, 4, 64, 64][..],
                &[0, 3][..],
                &[1, 2, 3, 4, 5, 6, 7, 8][..],
            ] {
                let h = header(dtype, dims);
                let got = Header::decode(&h.encode().unwrap(), 2, 4, DEFAULT_MAX_BYTES).unwrap();
                assert_eq!(got, h);
                assert_eq!(
                    got.data_bytes(),
                    (dims.iter().product::<usize>() * dtype.size_in_bytes()) as u64
                );
            }
        }
        for op in [
            Op::Send,
            Op::Recv,
            Op::Broadcast,
            Op::AllGather,
            Op::Barrier,
        ] {
            let h = Header {
                op,
                seq: u64::MAX,
                src: 63,
                world: 64,
                tensor: None,
            };
            let got = Header::decode(&h.encode().unwrap(), 63, 64, 0).unwrap();
            assert_eq!((got.clone(), got.data_bytes()), (h, 0));
        }
    }

    #[test]
    fn corrupt_headers_are_refused_with_what_is_wrong() {
        let good = header(DType::F32, &[2, 3]).encode().unwrap();
        let err = |bytes: &[u8]| {
            Header::decode(bytes, 2, 4, DEFAULT_MAX_BYTES)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&good[..95]).contains("96 bytes, got 95"));
        let mut b = good;
        b[0] = b'X';
        assert!(err(&b).contains("magic"));
        let mut b = good;
        b[4] = 9;
        assert!(err(&b).contains("version 9"));
        let mut b = good;
        b[5] = 200;
        assert!(err(&b).contains("operation code 200"));
        let mut b = good;
        b[7] = 0;
        assert!(err(&b).contains("dtype code 0"));
        b[7] = 10;
        assert!(err(&b).contains("dtype code 10"));
        let mut b = good;
        b[6] = 7;
        assert!(err(&b).contains("flags its tensor with 7"));
        let mut b = good;
        b[24] = 9;
        assert!(err(&b).contains("9 dimensions"));
        // Another sender, or a group of another size, than the receiver expects.
        assert!(Header::decode(&good, 1, 4, DEFAULT_MAX_BYTES)
            .unwrap_err()
            .to_string()
            .contains("from rank 2 of a group of 4; expected rank 1 of 4"));
        assert!(Header::decode(&good, 2, 3, DEFAULT_MAX_BYTES).is_err());
    }

    #[test]
    fn huge_or_overflowing_shapes_never_reach_an_allocation() {
        let mut b = header(DType::F32, &[2, 3]).encode().unwrap();
        // One dimension of 2^62 f32s: 2^64 bytes, an overflow.
        b[32..40].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(
            Header::decode(&b, 2, 4, u64::MAX),
            Err(WireError::TooLarge { .. })
        ));
        // Products that overflow only across dimensions.
        let mut b = header(DType::U8, &[1, 1, 1]).encode().unwrap();
        for i in 0..3 {
            b[32 + 8 * i..40 + 8 * i].copy_from_slice(&(1u64 << 30).to_le_bytes());
        }
        assert!(Header::decode(&b, 2, 4, u64::MAX).is_err());
        // Within u64 but above the bound.
        let h = header(DType::F16, &[1024, 1024, 1024]);
        let e = Header::decode(&h.encode().unwrap(), 2, 4, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("1073741824-byte bound"), "{e}");
        assert!(Header::decode(&h.encode().unwrap(), 2, 4, 2 << 30).is_ok());
    }

    #[test]
    fn rank_counts_are_bounded() {
        for world in [0, MAX_WORLD + 1, usize::MAX] {
            assert_eq!(ids_len(world), Err(WireError::World(world)));
            let h = Header {
                world,
                src: 0,
                ..header(DType::F32, &[1])
            };
            assert!(h.encode().is_err());
        }
        let h = Header {
            src: 4,
            ..header(DType::F32, &[1])
        };
        assert!(h.encode().is_err(), "a sender outside the group");
        assert_eq!(ids_len(1), Ok(0));
        assert_eq!(ids_len(4), Ok(24 * UNIQUE_ID_LEN));
        let blob: Vec<u8> = (0..ids_len(3).unwrap()).map(|i| (i % 251) as u8).collect();
        let ids = split_ids(&blob, 3).unwrap();
        assert_eq!(ids.len(), 12);
        assert_eq!(ids[1][0], (UNIQUE_ID_LEN % 251) as u8);
        let e = split_ids(&blob[1..], 3).unwrap_err().to_string();
        assert!(e.contains("needs 1536"), "{e}");
        // A header claiming a world size past the bound cannot be made to decode.
        let mut b = header(DType::F32, &[1]).encode().unwrap();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Header::decode(&b, 2, 4, DEFAULT_MAX_BYTES).is_err());
    }

    #[test]
    fn pair_indices_cover_every_ordered_pair_once() {
        for world in 1..=MAX_WORLD.min(9) {
            let mut seen = vec![false; CHANNELS * world * (world - 1)];
            for c in 0..CHANNELS {
                for s in 0..world {
                    for d in (0..world).filter(|&d| d != s) {
                        let i = pair_index(c, s, d, world);
                        assert!(!seen[i], "channel {c}, {s}->{d} of {world}");
                        seen[i] = true;
                    }
                }
            }
            assert!(seen.iter().all(|&x| x));
        }
    }

    #[test]
    fn unsupported_dtypes_and_too_many_dims_cannot_be_encoded() {
        assert!(matches!(
            header(DType::F8E4M3, &[1]).encode(),
            Err(WireError::UnsupportedDType(DType::F8E4M3))
        ));
        assert_eq!(
            header(DType::F32, &[1; 9]).encode(),
            Err(WireError::TooManyDims(9))
        );
    }
}
