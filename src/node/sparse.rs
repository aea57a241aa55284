//! Unpacking a release from only the frames a node lacks (issue 15, part 2): the frames it
//! fetched, each checked against the artifact's index, and for the rest the tar headers the
//! index keeps, the files' data linked from the releases already here.

use std::io;

use crate::archive::Frame;

/// Where a sparse unpack gets the compressed bytes of the frames it needs: asked for each in
/// artifact order, once.
pub trait FrameSource {
    /// The compressed bytes of frame `number` (`frame` says where it lies in the artifact and
    /// how long it is). The caller checks them against the index.
    fn frame(&mut self, number: usize, frame: &Frame) -> io::Result<Vec<u8>>;
}
