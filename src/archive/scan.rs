//! Finding an upload's frames ([`Frame`]) in its compressed bytes as they stream past, from the
//! zstd frame and block headers alone (RFC 8878), for the frame table of the artifact's index.

use sha2::{Digest as _, Sha256};

use super::frames::{Frame, MAX_FRAMES};
use crate::digest::Digest;

/// Finds the frames of a zstd stream in its compressed bytes, fed in pieces of any size, from
/// the frame and block headers alone (RFC 8878): it never decompresses and never refuses —
/// the archive check is what accepts or refuses an upload. Whatever it cannot lay out
/// (a frame without its content size, as `tar --zstd` writes through a pipe; more than
/// [`MAX_FRAMES`]; bytes that are not zstd) makes the table one frame: the whole artifact.
pub struct FrameScanner {
    /// Bytes fed so far.
    pos: u64,
    state: State,
    /// The header bytes of the current state, gathered across pieces.
    head: [u8; 14],
    have: usize,
    /// The frame being read, once its first byte was classified.
    group: Option<Group>,
    /// The current zstd frame ends with a 4-byte checksum.
    checksum: bool,
    frames: Vec<Frame>,
    raw: u64,
    /// Why the table is one frame (kept for tests and logs).
    given_up: Option<&'static str>,
}

struct Group {
    offset: u64,
    raw_length: u64,
    hasher: Sha256,
    zstd: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// 4 bytes: a zstd or skippable frame's magic number.
    Magic,
    /// 4 bytes: a skippable frame's size.
    SkippableSize,
    /// 1 byte: the frame header descriptor.
    Descriptor,
    /// The rest of the frame header: window descriptor, dictionary id, content size.
    Header { len: usize, fcs_len: usize },
    /// 3 bytes: a block header.
    Block,
    /// Bytes passed over: a block's content, a checksum, a skippable frame's data.
    Skip { left: u64, then: Then },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Block,
    Magic,
}

impl Default for FrameScanner {
    fn default() -> Self {
        FrameScanner::new()
    }
}

impl FrameScanner {
    pub fn new() -> FrameScanner {
        FrameScanner {
            pos: 0,
            state: State::Magic,
            head: [0; 14],
            have: 0,
            group: None,
            checksum: false,
            frames: Vec::new(),
            raw: 0,
            given_up: None,
        }
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.given_up.is_none() {
            if let State::Skip { left, then } = self.state {
                let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                self.hash(&data[..n]);
                (self.pos, data) = (self.pos + n as u64, &data[n..]);
                self.state =
                    if left == n as u64 { self.after(then) } else { State::Skip { left: left - n as u64, then } };
                continue;
            }
            let want = self.wanted();
            let n = data.len().min(want - self.have);
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            // A magic number is hashed once it is known which frame it starts.
            if self.state != State::Magic {
                self.hash(&data[..n]);
            }
            (self.have, self.pos, data) = (self.have + n, self.pos + n as u64, &data[n..]);
            if self.have == want {
                self.have = 0;
                self.step();
            }
        }
    }

    /// The frame table of the stream fed, `size` bytes long, that decompressed to `raw` bytes
    /// and hashed to `digest`; one frame for the whole stream unless every frame was laid out
    /// and they add up.
    pub fn finish(mut self, size: u64, raw: u64, digest: Digest) -> Vec<Frame> {
        let whole = || vec![Frame { offset: 0, length: size, raw_offset: 0, raw_length: raw, sha256: digest }];
        if self.given_up.is_some() || self.state != State::Magic || self.have != 0 || self.pos != size {
            return whole();
        }
        match self.group.take() {
            Some(group) if group.zstd => self.close(group, size),
            _ => return whole(),
        }
        if self.given_up.is_some() || self.raw != raw {
            return whole();
        }
        self.frames
    }

    /// Why the stream is one frame, if it is (known before [`finish`](Self::finish) only for
    /// what the headers showed).
    pub fn given_up(&self) -> Option<&'static str> {
        self.given_up
    }

    fn wanted(&self) -> usize {
        match self.state {
            State::Magic | State::SkippableSize => 4,
            State::Descriptor => 1,
            State::Header { len, .. } => len,
            State::Block => 3,
            State::Skip { .. } => unreachable!("skipping is not gathering"),
        }
    }

    fn after(&self, then: Then) -> State {
        match then {
            Then::Block => State::Block,
            Then::Magic => State::Magic,
        }
    }

    fn hash(&mut self, data: &[u8]) {
        if let Some(group) = &mut self.group {
            group.hasher.update(data);
        }
    }

    fn give_up(&mut self, why: &'static str) {
        self.given_up = Some(why);
        self.frames = Vec::new();
        self.group = None;
    }

    /// Ends the frame `group` before the byte at `end`.
    fn close(&mut self, group: Group, end: u64) {
        if self.frames.len() >= MAX_FRAMES {
            return self.give_up("more frames than the table holds");
        }
        let Some(raw_end) = self.raw.checked_add(group.raw_length) else {
            return self.give_up("content sizes past 2^64");
        };
        self.frames.push(Frame {
            offset: group.offset,
            length: end - group.offset,
            raw_offset: self.raw,
            raw_length: group.raw_length,
            sha256: Digest::from_hasher(group.hasher),
        });
        self.raw = raw_end;
    }

    /// The current state's bytes are all in `head`.
    fn step(&mut self) {
        let head = self.head;
        match self.state {
            State::Magic => {
                let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let start = self.pos - 4;
                if magic == ZSTD_MAGIC {
                    match self.group.take() {
                        Some(group) if group.zstd => {
                            self.close(group, start);
                            if self.given_up.is_some() {
                                return;
                            }
                            self.group =
                                Some(Group { offset: start, raw_length: 0, hasher: Sha256::new(), zstd: true });
                        }
                        Some(mut group) => {
                            group.zstd = true;
                            self.group = Some(group);
                        }
                        None => {
                            self.group = Some(Group { offset: start, raw_length: 0, hasher: Sha256::new(), zstd: true })
                        }
                    }
                    self.hash(&head[..4]);
                    self.state = State::Descriptor;
                } else if magic & 0xFFFF_FFF0 == SKIPPABLE_MAGIC {
                    if self.group.is_none() {
                        self.group = Some(Group { offset: start, raw_length: 0, hasher: Sha256::new(), zstd: false });
                    }
                    self.hash(&head[..4]);
                    self.state = State::SkippableSize;
                } else {
                    self.give_up("not a zstd frame");
                }
            }
            State::SkippableSize => {
                let left = u64::from(u32::from_le_bytes([head[0], head[1], head[2], head[3]]));
                self.state = if left == 0 { State::Magic } else { State::Skip { left, then: Then::Magic } };
            }
            State::Descriptor => {
                let fhd = head[0];
                if fhd & 0x08 != 0 {
                    return self.give_up("a reserved bit of a frame header is set");
                }
                let single_segment = fhd & 0x20 != 0;
                self.checksum = fhd & 0x04 != 0;
                let dict_len = [0, 1, 2, 4][usize::from(fhd & 0x03)];
                let fcs_len = match fhd >> 6 {
                    0 if single_segment => 1,
                    0 => return self.give_up("a frame without its content size"),
                    1 => 2,
                    2 => 4,
                    _ => 8,
                };
                let len = usize::from(!single_segment) + dict_len + fcs_len;
                self.state = State::Header { len, fcs_len };
            }
            State::Header { len, fcs_len } => {
                let mut bytes = [0u8; 8];
                bytes[..fcs_len].copy_from_slice(&head[len - fcs_len..len]);
                let mut size = u64::from_le_bytes(bytes);
                if fcs_len == 2 {
                    size += 256;
                }
                if let Some(group) = &mut self.group {
                    group.raw_length = size;
                }
                self.state = State::Block;
            }
            State::Block => {
                let header = u32::from_le_bytes([head[0], head[1], head[2], 0]);
                let last = header & 1 != 0;
                let size = u64::from(header >> 3);
                let content = match (header >> 1) & 3 {
                    0 | 2 => size,
                    1 => 1,
                    _ => return self.give_up("a reserved block type"),
                };
                if size > MAX_BLOCK {
                    return self.give_up("a block larger than zstd writes");
                }
                // The block's content, and after the last block its checksum, if any.
                let left = content + if last && self.checksum { 4 } else { 0 };
                let then = if last { Then::Magic } else { Then::Block };
                self.state = if left == 0 { self.after(then) } else { State::Skip { left, then } };
            }
            State::Skip { .. } => unreachable!("skipping is not gathering"),
        }
    }
}

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// The largest block zstd writes or reads (`ZSTD_BLOCKSIZE_MAX`).
const MAX_BLOCK: u64 = 128 << 10;
