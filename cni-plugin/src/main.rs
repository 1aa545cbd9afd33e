//! `spright-cni`: the CNI plugin of spright (see README.md for the config keys).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    spright_cni::cli::main()
}
