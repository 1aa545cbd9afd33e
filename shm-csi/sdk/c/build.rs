//! Generates the C header from src/lib.rs with cbindgen (into OUT_DIR, and
//! into the committed include/spright_shm.h unless CI is set, so a stale
//! committed header fails tests/header.rs on CI), and the pkg-config file
//! spright_shm.pc next to the built library, for the install prefix in
//! SPRIGHT_SHM_PREFIX (default /usr/local).

use std::{env, fs, path::PathBuf};

fn main() {
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=CI");
    println!("cargo:rerun-if-env-changed=SPRIGHT_SHM_PREFIX");

    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let header = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("generating spright_shm.h");
    let generated = out.join("spright_shm.h");
    header.write_to_file(&generated);
    let committed = dir.join("include").join("spright_shm.h");
    if env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false") {
        let new = fs::read(&generated).expect("generated header");
        if fs::read(&committed).ok().as_ref() != Some(&new) {
            fs::create_dir_all(committed.parent().expect("include/")).expect("include/");
            fs::write(&committed, new).expect("writing include/spright_shm.h");
        }
    }

    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out: the library is
    // three levels up.
    let prefix = env::var("SPRIGHT_SHM_PREFIX").unwrap_or_else(|_| "/usr/local".into());
    let version = env::var("CARGO_PKG_VERSION").expect("set by cargo");
    let pc = format!(
        "prefix={prefix}\nexec_prefix=${{prefix}}\nlibdir=${{exec_prefix}}/lib\nincludedir=${{prefix}}/include\n\n\
         Name: spright_shm\n\
         Description: spright's zero-copy SDK for chained functions (shared-memory pool, descriptors, event-driven stages)\n\
         Version: {version}\n\
         Libs: -L${{libdir}} -lspright_shm\n\
         Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl\n\
         Cflags: -I${{includedir}}\n"
    );
    fs::write(out.join("spright_shm.pc"), &pc).expect("writing spright_shm.pc");
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let _ = fs::write(profile_dir.join("spright_shm.pc"), &pc);
    }
}
