//! Generates the control API from the proto in the `shared` crate. Uses the machine's `protoc`
//! when there is one (or `PROTOC`), else the vendored binary, so a build needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../shared/proto/switchyard/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let have_protoc = std::env::var_os("PROTOC").is_some()
        || std::process::Command::new("protoc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !have_protoc {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("control_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .compile_protos(&[proto], &["../shared/proto"])?;
    Ok(())
}
