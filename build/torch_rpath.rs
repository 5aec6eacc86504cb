//! Shared build script of every package that builds binaries, tests or benches linked to
//! libtorch (each package's Cargo.toml names it with `build = "../build/torch_rpath.rs"`).
//!
//! torch-sys tells its direct dependents where libtorch is (`DEP_TCH_LIBTORCH_LIB`). We
//! bake that directory into the binaries' RUNPATH so they start without LD_LIBRARY_PATH,
//! and link libtorch_cuda with `--no-as-needed`: nothing references its symbols directly,
//! so the linker's default `--as-needed` would drop it and CUDA would silently be
//! unavailable on a GPU machine.
use std::path::Path;

#[allow(dead_code)]
fn main() {
    rpath();
}

/// The RUNPATH and link arguments above (also called by model/build.rs).
pub fn rpath() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // cudarc dlopens libnccl.so, which scripts/setup.sh links beside the wheel's
    // libnccl.so.2; put that directory on the RUNPATH too.
    let nccl = Path::new(&lib).join("../../nvidia/nccl/lib");
    if nccl.exists() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
    }
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
