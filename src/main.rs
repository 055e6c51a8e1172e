//! The `factum` binary; everything lives in the `factum-cli` crate.

fn main() -> std::process::ExitCode {
    factum_cli::run()
}
