//! Link arguments for the guest image: a static, non-PIE executable at the ABI's image
//! base with no C runtime. Passed with `rustc-link-arg-bins` so that they reach only the
//! guest binary (RUSTFLAGS would also reach build scripts).

fn main() {
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--image-base=0x200000",
        "-Wl,--build-id=none",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
