//! Compiles `rollout/v1/rollout.proto` into OUT_DIR with the protoc binary vendored by
//! `protoc-bin-vendored`, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC; setting it for this build script only.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=rollout/v1/rollout.proto");
    println!("cargo:rerun-if-changed=build.rs");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Weight chunks as `Bytes`: the sender slices one buffer per tensor into chunks
        // and shares them between workers without copying; the receiver decodes them as
        // views of the frame buffer.
        .bytes(".rollout.v1.TensorChunk.data")
        .compile_protos(&["rollout/v1/rollout.proto"], &["."])?;
    Ok(())
}
