//! The `eliot` command line, built inside the test crate so that the fault
//! tests run the same binary with the features of this build
//! (`CARGO_BIN_EXE_eliot-under-test`), without a second build of the host.

fn main() -> std::process::ExitCode {
    eliot::cli::main()
}
