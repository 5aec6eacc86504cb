//! The model's build script: the shared RUNPATH setup (../build/torch_rpath.rs) and the
//! fused CPU ops of csrc/fused_ops.cpp and csrc/segment_attention.cpp, compiled against
//! the libtorch that torch-sys found (its headers sit beside `DEP_TCH_LIBTORCH_LIB`).
use std::path::PathBuf;

#[path = "../build/torch_rpath.rs"]
mod torch_rpath;

fn main() {
    torch_rpath::rpath();
    println!("cargo:rerun-if-changed=csrc/fused_ops.cpp");
    println!("cargo:rerun-if-changed=csrc/segment_attention.cpp");
    println!("cargo:rerun-if-changed=csrc/simd.h");
    println!("cargo:rerun-if-changed=csrc/ffi.h");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys reports libtorch's library directory (DEP_TCH_LIBTORCH_LIB)"),
    );
    let root = lib.parent().expect("libtorch's lib directory has a parent");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .file("csrc/fused_ops.cpp")
        .file("csrc/segment_attention.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-psabi")
        .flag_if_supported("-fopenmp-simd")
        // As PyTorch builds its kernels: lets comparisons and selects vectorise.
        .flag_if_supported("-fno-math-errno")
        .flag_if_supported("-fno-trapping-math")
        .opt_level(3)
        .warnings(false)
        .compile("grpo_fused_ops");
}
