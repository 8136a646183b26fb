//! Builds one libbpf skeleton per `src/bpf/*.bpf.c` into OUT_DIR (never into git).
//! Without the `agent` feature (the parsers alone, as fuzz/ builds them) there is nothing to build.
#[cfg(not(feature = "agent"))]
fn main() {}

#[cfg(feature = "agent")]
fn main() {
    use libbpf_cargo::SkeletonBuilder;
    use std::{env, ffi::OsStr, path::PathBuf};

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let arch = match env::var("CARGO_CFG_TARGET_ARCH")
        .expect("target arch")
        .as_str()
    {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => panic!("no vendored vmlinux.h for {other}: run scripts/gen-vmlinux.sh"),
    };
    let vmlinux = PathBuf::from("vmlinux").join(arch);
    println!("cargo:rerun-if-changed=vmlinux/{arch}/vmlinux.h");
    println!("cargo:rerun-if-changed=src/bpf");
    for entry in std::fs::read_dir("src/bpf").expect("src/bpf") {
        let path = entry.expect("dir entry").path();
        let Some(name) = path.file_name().and_then(OsStr::to_str) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".bpf.c") else {
            continue;
        };
        SkeletonBuilder::new()
            .source(&path)
            .clang_args([
                OsStr::new("-I"),
                vmlinux.as_os_str(),
                OsStr::new("-Isrc/bpf"),
                OsStr::new("-Wall"),
                OsStr::new("-Werror"),
                OsStr::new("-Wno-unused-function"),
            ])
            .build_and_generate(out.join(format!("{stem}.skel.rs")))
            .unwrap_or_else(|e| panic!("building {}: {e:#}", path.display()));
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
