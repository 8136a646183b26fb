//! The generated libbpf skeletons (built by build.rs into OUT_DIR).

/// One module per skeleton, generated code exempt from the project's lints.
macro_rules! skeleton {
    ($($name:ident => $file:literal),* $(,)?) => {$(
        #[allow(
            clippy::all,
            clippy::pedantic,
            clippy::undocumented_unsafe_blocks,
            dead_code,
            unused
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    )*};
}

skeleton! {
    l7 => "l7.skel.rs",
    probe => "probe.skel.rs",
    tcp => "tcp.skel.rs",
    netpath => "netpath.skel.rs",
    gpu => "gpu.skel.rs",
    exec => "exec.skel.rs",
    floor => "floor.skel.rs",
}
