//! The spright-cni plugin's own entry point, built inside the tests package so
//! that `cargo test -p spright-tests` always runs an up-to-date plugin (cargo
//! builds a package's binaries before its integration tests; it does not
//! build other packages' binaries). Identical to `cni-plugin/src/main.rs`.

fn main() -> std::process::ExitCode {
    spright_cni::cli::main()
}
