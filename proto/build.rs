//! Generates the tonic/prost code and the descriptor set with a vendored protoc: no system
//! `protoc` is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "kvcache/v1/common.proto",
        "kvcache/v1/cache_node.proto",
        "kvcache/v1/coordinator.proto",
        "kvcache/v1/worker.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        // Payloads decode as slices of the receive buffer, not copies.
        .bytes(".")
        .file_descriptor_set_path(out.join("kvcache_descriptor.bin"))
        .compile_protos(&files, &["."])?;
    Ok(())
}
