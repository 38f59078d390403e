//! Replays every file of `fuzz/corpus/<target>` (seeds and the inputs that
//! once crashed) through the same function the fuzz target calls, on
//! stable: `cargo test --manifest-path fuzz/Cargo.toml --no-default-features`.
//! Seeds (`seed-*`) must also get as far as they were made to: accepted all
//! the way, or refused where the name says `refused`; other files (inputs
//! that once crashed) only must not panic.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8]) -> bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no corpus", dir.display());
    for file in files {
        let data = std::fs::read(&file).unwrap();
        eprintln!("{}", file.display());
        let accepted = run(&data);
        let name = file.file_name().unwrap().to_string_lossy();
        if name.starts_with("seed-") {
            let refused = name.contains("refused");
            assert_eq!(
                accepted,
                !refused,
                "{}: {}",
                file.display(),
                if refused { "accepted" } else { "refused" }
            );
        }
    }
}

#[test]
fn csr() {
    replay("csr", meshca_fuzz::csr);
}

#[test]
fn ca_bundle() {
    replay("ca_bundle", meshca_fuzz::ca_bundle);
}

#[test]
fn jwt() {
    replay("jwt", meshca_fuzz::jwt);
}

#[test]
fn grpc() {
    replay("grpc", meshca_fuzz::grpc);
}

#[test]
fn decide() {
    replay("decide", meshca_fuzz::decide);
}

#[test]
fn ra_chain() {
    replay("ra_chain", meshca_fuzz::ra_chain);
}

#[test]
fn pcr() {
    replay("pcr", meshca_fuzz::pcr);
}
