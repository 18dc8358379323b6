//! Schemathesis (property-based API testing, from PyPI) against `GET /openapi.json`
//! of a real server: a bounded number of generated requests per operation, none
//! may get a 5xx or a response the document does not describe (status code,
//! content type, body schema).
//!
//! The tool lives in a virtual environment created once under the target
//! directory (`target/tmp/schemathesis-venv`, pinned version) and reused while
//! the pin is unchanged. `AETHER_SKIP_PY_TESTS=1` skips this test (with a
//! message); otherwise it needs `python3 -m venv` and PyPI.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;

const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Generated requests per operation and phase.
const MAX_EXAMPLES: &str = "20";
/// Fixed so a run can be repeated; `AETHER_ST_SEED` picks another.
const DEFAULT_SEED: &str = "13";
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance";

fn skipped() -> bool {
    if std::env::var("AETHER_SKIP_PY_TESTS").as_deref() == Ok("1") {
        println!("AETHER_SKIP_PY_TESTS=1: the schemathesis run is skipped");
        return true;
    }
    false
}

fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `st` executable, installing it the first time (or when the pin changed).
fn schemathesis(dir: &Path) -> PathBuf {
    let venv = dir.join("schemathesis-venv");
    let st = venv.join("bin/st");
    let stamp = venv.join("installed.txt");
    if st.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(SCHEMATHESIS) {
        return st;
    }
    let started = Instant::now();
    run(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
        "python3 -m venv (Debian: apt-get install python3-venv)",
    );
    run(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            SCHEMATHESIS,
        ]),
        "pip install schemathesis",
    );
    std::fs::write(&stamp, SCHEMATHESIS).unwrap();
    println!("installed {SCHEMATHESIS} in {:?}", started.elapsed());
    st
}

/// One `st run` over the operations `filter` selects, as the holder of `token`.
fn st_run(st: &Path, dir: &Path, url: &str, token: &str, filter: &[&str]) -> String {
    let seed = std::env::var("AETHER_ST_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    let out = Command::new(st)
        .current_dir(dir)
        .args([
            "run",
            url,
            "--checks",
            CHECKS,
            "--max-examples",
            MAX_EXAMPLES,
        ])
        .args(["--seed", &seed, "--request-timeout", "30"])
        .args([
            "--suppress-health-check",
            "too_slow,data_too_large,filter_too_much",
        ])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(filter)
        .env("NO_COLOR", "1")
        .output()
        .expect("st runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found problems (seed {seed}):\n{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_what_the_server_does() {
    if skipped() {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let st = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || schemathesis(&dir)
    })
    .await
    .unwrap();
    let t = TestServer::start().await;
    // A user with a file, so reads and listings reach real rows. The token has no
    // session, so the generated sign-outs cannot revoke it mid-run.
    let (uid, _) = t.sign_up("schemathesis@example.com").await;
    let token = user_token(&uid);
    t.upload(&token, "docs/a.png", vec![1, 2, 3], "image/png")
        .await;
    let url = t.url("/openapi.json");

    let started = Instant::now();
    let service_only = "^/(metrics/|api/v1/ws/|ws/channels)";
    let user_run = {
        let (st, dir, url) = (st.clone(), dir.clone(), url.clone());
        let filter = ["--exclude-path-regex", service_only];
        tokio::task::spawn_blocking(move || st_run(&st, &dir, &url, &token, &filter))
            .await
            .unwrap()
    };
    let service_run = {
        let (st, dir) = (st.clone(), dir.clone());
        let filter = ["--include-path-regex", service_only];
        tokio::task::spawn_blocking(move || st_run(&st, &dir, &url, &service_token(), &filter))
            .await
            .unwrap()
    };
    for (run, text) in [("user", &user_run), ("service_role", &service_run)] {
        let summary = text
            .lines()
            .filter(|l| l.contains("generated") || l.contains("Selected"))
            .collect::<Vec<_>>()
            .join(" | ");
        println!("{run}: {summary}");
        assert!(
            text.contains("generated"),
            "no summary from schemathesis:\n{text}"
        );
    }
    println!("schemathesis runs took {:?}", started.elapsed());
    // The server is still healthy after all of it.
    assert_eq!(reqwest_lite(&t.url("/health")).await.unwrap(), 200);
}
