// Bare-metal builds link with a minimal linker script (flash + RAM, entry `reset`).
fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "none" {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
        println!("cargo:rustc-link-arg=-T{dir}/firmware.ld");
        println!("cargo:rerun-if-changed=firmware.ld");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
