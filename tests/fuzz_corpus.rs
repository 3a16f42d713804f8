//! Replays every file of every fuzz target's corpus (seeds, and every crash ever found)
//! through the same entry points as the fuzzers, on stable.

#[path = "../fuzz/entry.rs"]
mod entry;

#[test]
fn every_corpus_file_replays_without_panicking() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut replayed = 0;
    for (name, target) in entry::TARGETS {
        let dir = root.join(name);
        let files = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for file in files {
            let path = file.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panics on {}", path.display());
            replayed += 1;
        }
    }
    assert!(replayed >= 15, "the corpus is there: {replayed} files");
}
