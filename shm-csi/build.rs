//! Generates the CSI v1 messages and services from the spec's proto
//! (`proto/csi.proto`, CSI v1.3.0). protox compiles the proto in-process, so
//! the build needs no `protoc` on the machine.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
