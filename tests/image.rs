//! The Dockerfile, checked without a container engine (none runs here, and
//! base images cannot be pulled): the build context that .dockerignore lets
//! through is exactly what the build stage copies, and it is enough for
//! cargo to parse the manifest (every declared target present) and resolve
//! the locked dependencies, as `cargo build --release --locked` in the image
//! will; the runtime stage holds the binary and nothing else.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(name)).expect(name)
}

/// Dockerfile instructions (continuation lines joined), by stage.
fn stages() -> Vec<Vec<String>> {
    let text = read("Dockerfile").replace("\\\n", " ");
    let mut stages: Vec<Vec<String>> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("FROM comes first")
            .push(line.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    stages
}

/// The paths .dockerignore lets through (`*` then `!path` lines).
fn context_paths() -> Vec<String> {
    let text = read(".dockerignore");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.first(), Some(&"*"), "everything excluded first");
    lines[1..]
        .iter()
        .map(|l| {
            l.strip_prefix('!')
                .unwrap_or_else(|| panic!("only !path lines after *: {l}"))
                .trim_end_matches('/')
                .to_string()
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

#[test]
fn build_stage_copies_exactly_the_context_and_builds_locked() {
    let stages = stages();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build = &stages[0];
    assert!(
        build[0].starts_with("FROM rust:") && build[0].ends_with("-slim-bookworm AS build"),
        "{}",
        build[0]
    );
    let runs = build
        .iter()
        .filter(|l| l.starts_with("RUN "))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(runs.contains("libclang-dev"), "bindgen needs libclang");
    assert!(runs.contains("cargo build --release --locked"), "{runs}");

    let mut copied: Vec<String> = Vec::new();
    for l in build.iter().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = l.split_whitespace().skip(1).collect();
        copied.extend(words[..words.len() - 1].iter().map(|s| s.to_string()));
    }
    let mut context = context_paths();
    copied.sort();
    context.sort();
    assert_eq!(copied, context, "COPY sources vs .dockerignore");

    // The context alone: cargo parses the manifest (every declared target
    // must be there) and resolves exactly Cargo.lock for this platform.
    let dir = std::env::temp_dir().join(format!("podnat-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for p in &context {
        copy_tree(&Path::new(ROOT).join(p), &dir.join(p));
    }
    let host = String::from_utf8(
        Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc -vV")
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
    .expect("host triple");
    let out = Command::new(env!("CARGO"))
        .args(["fetch", "--locked", "--target", &host])
        .current_dir(&dir)
        .output()
        .expect("cargo fetch");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the image's build context is incomplete or Cargo.lock is stale:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn runtime_stage_holds_only_the_binary() {
    let stages = stages();
    let runtime = &stages[1];
    assert!(
        runtime[0].starts_with("FROM gcr.io/distroless/cc-debian12"),
        "{}",
        runtime[0]
    );
    assert!(
        !runtime.iter().any(|l| l.starts_with("RUN ")),
        "nothing installed at run time"
    );
    let copies: Vec<&String> = runtime.iter().filter(|l| l.starts_with("COPY ")).collect();
    assert_eq!(
        copies,
        vec!["COPY --from=build /src/target/release/podnat-controller /usr/local/bin/podnat-controller"]
    );
    assert!(runtime.contains(&r#"ENTRYPOINT ["/usr/local/bin/podnat-controller"]"#.to_string()));
    let all = read("Dockerfile");
    for tool in ["iptables", "nftables"] {
        assert!(
            !all.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.contains(tool)),
            "{tool} in the image"
        );
    }
}
