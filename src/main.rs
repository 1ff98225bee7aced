//! The `claygate` binary; all of it lives in the library's `cli` module.

/// mimalloc instead of the system allocator: a call allocates a few dozen
/// times (HTTP parsing on both sides, headers, JSON), and under callgrind
/// glibc's malloc and free were a quarter of an invoke's instructions.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    claygate::cli::main()
}
