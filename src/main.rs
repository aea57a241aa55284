//! The `release` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

/// mimalloc keeps freed memory for reuse instead of returning it to the kernel at once: an
/// upload streams a gigabyte through short-lived buffers, and fresh pages (zeroed by the
/// kernel, faulted in one by one) cost ~10% of the upload time on the machines we measured.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    release::cli::run(release::cli::parse())
}
