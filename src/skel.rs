//! The generated libbpf skeletons (built by build.rs into OUT_DIR).

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    unused
)]
pub mod l7 {
    include!(concat!(env!("OUT_DIR"), "/l7.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    unused
)]
pub mod probe {
    include!(concat!(env!("OUT_DIR"), "/probe.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    unused
)]
pub mod tcp {
    include!(concat!(env!("OUT_DIR"), "/tcp.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    unused
)]
pub mod netpath {
    include!(concat!(env!("OUT_DIR"), "/netpath.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    unused
)]
pub mod gpu {
    include!(concat!(env!("OUT_DIR"), "/gpu.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    unused
)]
pub mod exec {
    include!(concat!(env!("OUT_DIR"), "/exec.skel.rs"));
}
