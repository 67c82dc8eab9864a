//! The `eliot` binary; the command line lives in [`eliot::cli`].

fn main() -> std::process::ExitCode {
    eliot::cli::main()
}
